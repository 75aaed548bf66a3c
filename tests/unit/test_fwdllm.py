"""FwdLLM: pooled forward-gradient probes, pacing, discriminative sampling, and a whole
federation of real ClientApps in this process (no Ray: it adds nothing here)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.config import load_scenario
from fedtune.engines.seeds import (
    alignment,
    combine,
    merge_probes,
    perturbation,
    pick_directions,
    pooled_estimate,
    replay,
    seed_pool,
)
from fedtune.errors import ConfigError, FedtuneError
from fedtune.protocol import (
    ARRAYS_KEY,
    GUIDE_KEY,
    METRICS_KEY,
    PROBES_KEY,
    SEEDS_KEY,
    WEIGHT_KEY,
    TrainInstructions,
)
from fedtune.server.loop import run_federation, seeded_global_random
from fedtune.server.seed_sync import SeedSync
from fedtune.strategies import build_strategy
from fedtune.wire import from_record, seeds_to_record, to_record

from .node_grid import InProcessGrid, NodeListGrid, task_identity

K, LR = 64, 0.01
POOL = seed_pool(0, K)
ADAPTER = {
    "layers.0.q_proj.lora_A.weight": torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),
    "layers.0.q_proj.lora_B.weight": torch.zeros(8, 4),
}
SPECS = [(k, tuple(v.shape)) for k, v in sorted(ADAPTER.items())]
SPEC = {"run.seed": 0, "client.num_seeds": K, "client.lr": LR, "client.engine": "forward"}


@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


def probe_reply(probes: list[tuple[int, float]]) -> Message:
    """A reply as the round loop hands it to the strategy: probes as a config record."""
    content = RecordDict(
        {SEEDS_KEY: seeds_to_record(probes), METRICS_KEY: MetricRecord({WEIGHT_KEY: 4})}
    )
    message = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    SeedSync.for_strategy(message, probes)
    message.content[ARRAYS_KEY] = to_record(ADAPTER)
    return message


def configured(params: dict, nodes: int = 4):
    strategy = build_strategy("fwdllm", params, population=nodes, clients_per_round=2)
    config = ConfigRecord({**SPEC, "round": 1})
    with seeded_global_random(0, 1):
        messages = list(
            strategy.configure_train(1, to_record(ADAPTER), config, NodeListGrid(range(nodes)))
        )
    return strategy, messages


def test_pooled_estimate_is_the_mean_of_the_clients_seed_rebuilt_estimates():
    rng = np.random.default_rng(3)
    clients = [
        [
            (int(i), float(np.float32(g)))
            for i, g in zip(rng.integers(K, size=5), rng.normal(size=5), strict=True)
        ]
        for _ in range(3)
    ]
    # Each client's estimate, rebuilt from its seeds alone: mean_i g_i z(pool[i]).
    own = []
    for probes in clients:
        total = {k: torch.zeros(s, dtype=torch.float64) for k, s in SPECS}
        for index, slope in probes:
            z = perturbation(POOL[index], SPECS)
            for k in total:
                total[k] += slope * z[k].double()
        own.append({k: t / len(probes) for k, t in total.items()})
    pooled, variance = pooled_estimate([p for c in clients for p in c], POOL, SPECS)
    for k, _ in SPECS:
        mean = sum(e[k] for e in own) / len(own)
        assert torch.allclose(pooled[k].double(), mean, rtol=0, atol=1e-6)
    assert variance > 0

    # The strategy steps along exactly that estimate, replayed from the merged seeds.
    strategy, messages = configured({"probes": 5})
    assert all(ARRAYS_KEY in m.content.array_records for m in messages)
    arrays, metrics = strategy.aggregate_train(1, [probe_reply(c) for c in clients])
    out = from_record(arrays)
    for k, _ in SPECS:
        expected = ADAPTER[k].double() - LR * sum(e[k] for e in own) / len(own)
        assert torch.allclose(out[k].double(), expected, rtol=0, atol=1e-6)
    assert metrics["fwdllm-probes"] == 15 and metrics["fwdllm-clients"] == 3
    assert math.isclose(metrics["fwdllm-variance"], variance, rel_tol=1e-9)
    all_probes = [p for c in clients for p in c]
    assert strategy.seed_history == [merge_probes(all_probes)]
    assert all(
        torch.equal(out[k], replay(ADAPTER, merge_probes(all_probes), POOL, LR)[k]) for k in out
    )


def test_the_variance_is_the_sample_variance_of_the_per_probe_estimates():
    probes = [(1, 0.5), (2, -1.0), (1, 0.25), (7, 2.0)]
    _, variance = pooled_estimate(probes, POOL, SPECS)
    rows = []
    for index, slope in probes:
        z = perturbation(POOL[index], SPECS)
        rows.append(torch.cat([slope * z[k].flatten().double() for k, _ in SPECS]))
    stacked = torch.stack(rows)  # n x D
    expected = float(stacked.var(dim=0, unbiased=True).mean()) / len(probes)
    assert math.isclose(variance, expected, rel_tol=1e-9)
    assert pooled_estimate(probes[:1], POOL, SPECS)[1] == math.inf


def test_pacing_asks_for_more_clients_exactly_while_the_variance_is_above_the_threshold():
    replies = [probe_reply([(1, 0.5), (2, -1.0)]), probe_reply([(3, 0.25), (4, 2.0)])]
    variance = pooled_estimate([(1, 0.5), (2, -1.0), (3, 0.25), (4, 2.0)], POOL, SPECS)[1]
    above, _ = configured({"probes": 2, "variance_threshold": variance * 0.999, "max_clients": 4})
    below, _ = configured({"probes": 2, "variance_threshold": variance * 1.001, "max_clients": 4})
    assert above.more_clients(1, replies, asked=2) == 1  # half the first wave of 2
    assert below.more_clients(1, replies, asked=2) == 0
    assert above.more_clients(1, replies, asked=4) == 0  # the cap
    off, _ = configured({"probes": 2})  # variance_threshold = 0: no pacing
    assert off.more_clients(1, replies, asked=2) == 0


def test_discriminative_sampling_keeps_only_directions_above_the_cosine_threshold():
    guide = combine([(5, 1.0), (9, -0.5)], POOL, SPECS)
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in guide.values()))
    kept, drawn = pick_directions(np.random.default_rng(0), 20, POOL, SPECS, guide, 1.5, 64)
    assert kept and drawn > len(kept)
    assert all(alignment(perturbation(POOL[i], SPECS), guide, norm) >= 1.5 for i in kept)
    # Uniform draws from the same generator include directions below the threshold.
    uniform, _ = pick_directions(np.random.default_rng(0), 20, POOL, SPECS)
    assert any(alignment(perturbation(POOL[i], SPECS), guide, norm) < 1.5 for i in uniform)
    # A threshold nothing reaches leaves every direction out rather than keeping bad ones.
    assert pick_directions(np.random.default_rng(0), 5, POOL, SPECS, guide, 10.0, 8)[0] == []


def test_the_guide_travels_with_the_next_rounds_messages():
    strategy, first = configured({"probes": 2, "guide_sigmas": 1.0})
    assert all(GUIDE_KEY not in m.content.array_records for m in first)
    assert all(TrainInstructions.of(m).probes == 2 for m in first)
    strategy.aggregate_train(1, [probe_reply([(1, 0.5), (2, -1.0)])])
    config = ConfigRecord({**SPEC, "round": 2})
    with seeded_global_random(0, 2):
        second = list(
            strategy.configure_train(2, to_record(ADAPTER), config, NodeListGrid(range(4)))
        )
    assert all(GUIDE_KEY in m.content.array_records for m in second)
    assert all(m.content.config_records["config"][PROBES_KEY] == 2 for m in second)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"probes": 0}, "strategy.probes"),
        ({"trains": "A"}, "strategy.trains"),
        ({"guide_sigmas": -1.0}, "strategy.guide_sigmas"),
        ({"variance_threshold": -1.0}, "strategy.variance_threshold"),
    ],
)
def test_bad_fwdllm_parameters_name_the_key(params, needle):
    with pytest.raises(FedtuneError, match=needle):
        build_strategy("fwdllm", params, population=4, clients_per_round=2)


def test_fwdllm_refuses_clients_of_another_engine():
    strategy = build_strategy("fwdllm", {}, population=4, clients_per_round=2)
    config = ConfigRecord({**SPEC, "client.engine": "zeroth"})
    with pytest.raises(ConfigError, match="client.engine = 'forward'"):
        strategy.configure_train(1, to_record(ADAPTER), config, NodeListGrid(range(4)))


@pytest.mark.slow
def test_a_federation_of_real_client_apps_learns_with_seed_only_uploads(tmp_path):
    """Three rounds of fwdllm on the tiny model: real ClientApps in this process, with
    pacing and discriminative sampling on; every upload is a few hundred bytes, later
    rounds catch clients up from seeds, and the held-out perplexity falls."""
    scenario = load_scenario(
        "tiny",
        [
            "client.engine='forward'",
            "strategy.name='fwdllm'",
            "strategy.probes=3",
            "strategy.variance_threshold=1e-9",
            "strategy.max_clients=4",
            "strategy.guide_sigmas=1.0",
            "client.lr=0.05",
            "run.rounds=3",
        ],
    )
    grid = InProcessGrid({100 + i: i for i in range(scenario.data.num_clients)})
    summary = run_federation(grid, scenario, tmp_path)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rounds = [e for e in events if e["event"] == "round" and e["round"] > 0]
    updates = [e for e in events if e["event"] == "client_update"]
    assert [r["status"] for r in rounds] == ["ok"] * 3
    assert all(r["sampled"] == 4 for r in rounds)  # 3, then pacing up to max_clients
    assert all(r["strategy_metrics"]["fwdllm-probes"] <= 12 for r in rounds)
    assert all(u["status"] == "ok" and u["bytes_up"] < 18_000 for u in updates)
    adapter_bytes = max(u["bytes_down"] for u in updates if u["round"] == 1)
    assert min(u["bytes_down"] for u in updates if u["round"] == 3) < adapter_bytes / 2
    assert summary["final_perplexity"] < summary["initial_perplexity"]


def test_a_paced_strategy_under_privacy_is_refused_before_the_run():
    from fedtune.checks import check_federation
    from fedtune.protocol import StrategyTraits

    scenario = load_scenario("tiny", ["privacy.mode='central'", "privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="pacing"):
        check_federation(scenario, StrategyTraits(paced=True), 6, {})
