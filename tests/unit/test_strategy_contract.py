"""The strategy contract: every built-in strategy through the same checks.

Each strategy is built by name through the registry and driven as fedtune's round loop
drives it: ``configure_train`` (on a grid of fixed node ids, Python's ``random`` seeded
per round), then ``aggregate_train`` over replies that passed ``check_update``, sorted
by client index. Server optimizers (FedAdam, FedYogi, FedAvgM) need that order: they
keep the adapter sent by ``configure_train`` and step from it.

Flower's FedMedian and FedTrimmedAvg consume the arrays of the replies they aggregate
(``ArrayRecord.pop``), so every aggregation here gets freshly built messages.

The test adapters are named as PEFT names LoRA factors (``...q_proj.lora_A.weight``,
``...lora_B.weight``): LoRA-aware strategies (``ffa-lora``, ``fedsa-lora``) select the
factors by name, so they go through the same checks as the others.
"""

from __future__ import annotations

import random
from importlib.metadata import entry_points

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.engines.seeds import replay, seed_pool
from fedtune.protocol import ARRAYS_KEY, METRICS_KEY, SEEDS_KEY, WEIGHT_KEY
from fedtune.server.loop import aggregate_in_client_order, seeded_global_random
from fedtune.server.seed_sync import SeedSync
from fedtune.strategies import build_strategy
from fedtune.strategies.registry import BUILTINS, GROUP
from fedtune.wire import check_update, expected_specs, from_record, seeds_to_record, to_record

from .node_grid import NodeListGrid, task_identity

SEED_STEP_RULES = {"fedkseed": "zeroth", "fwdllm": "forward"}
"""Rules over seed steps (-> their clients' engine): a client's reply is its seed steps,
which the loop replays into its adapter (the strategy gets both). Here client ``i``
replies :func:`seed_steps_of` ``(i)``: zeroth steps, or FwdLLM's probes, which replay
as one step along their mean."""
NAMES = sorted(BUILTINS)
NUM_SEEDS, SEED_LR = 64, 0.05
SPEC = {
    "run.seed": 0,
    "client.num_seeds": NUM_SEEDS,
    "client.lr": SEED_LR,
    "client.engine": "zeroth",
}
PARAMS: dict[str, dict[str, object]] = {
    # Settings under which the strategy does more than FedAvg; defaults otherwise.
    "fedprox": {"proximal_mu": 0.1},
    "fedavgm": {"server_momentum": 0.9},
    "trimmed-mean": {"beta": 0.2},
    "krum": {"num_malicious_nodes": 1},
}
DELTA_REPLIES = {"flora"}
"""Strategies whose clients reply with a fresh adapter to add, not a new global one."""
NODES = list(range(101, 109))
CLIENTS_PER_ROUND = 6

Adapter = dict[str, torch.Tensor]
Update = tuple[int, Adapter, int]
"""(client index, adapter, num-examples)"""


def _adapter(gen: torch.Generator, scale: float) -> Adapter:
    # PEFT's names: the LoRA-aware strategies find the factors by them.
    return {
        "layers.0.q_proj.lora_A.weight": scale * torch.randn(4, 8, generator=gen),
        "layers.0.q_proj.lora_B.weight": scale * torch.randn(8, 4, generator=gen),
    }


def _updates(seed: int, clients: list[int]) -> list[Update]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (index, {k: GLOBAL[k] + v for k, v in _adapter(gen, 0.5).items()}, 2 + index % 3)
        for index in clients
    ]


GLOBAL = _adapter(torch.Generator().manual_seed(0), 0.1)
ROUND_1 = _updates(1, [0, 2, 3, 5, 6, 7])
ROUND_2 = _updates(2, [1, 2, 3, 4, 6, 7])


@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


def reply(state: Adapter, weight: int) -> Message:
    content = RecordDict(
        {
            ARRAYS_KEY: to_record(state),
            METRICS_KEY: MetricRecord({WEIGHT_KEY: weight, "loss": 1.0 / weight}),
        }
    )
    return Message(content, dst_node_id=NODES[0], message_type=MessageType.TRAIN)


def seed_steps_of(index: int) -> list[tuple[int, float]]:
    return [((7 * index + 3) % NUM_SEEDS, 0.2 * (index + 1)), ((5 * index) % NUM_SEEDS, -0.3)]


def client_adapter(name: str, update: Update, sent: Adapter) -> Adapter:
    """The adapter client ``update[0]`` ends its round with, under strategy ``name``."""
    index, state, _ = update
    if name in SEED_STEP_RULES:
        steps = seed_steps_of(index)
        if SEED_STEP_RULES[name] == "forward":
            steps = [(i, g / len(steps)) for i, g in steps]
        return replay(sent, steps, seed_pool(0, NUM_SEEDS), SEED_LR)
    return state


def client_reply(name: str, update: Update, sent: Adapter) -> Message:
    """The reply as the round loop hands it to the strategy (seed steps replayed)."""
    index, _, weight = update
    message = reply(client_adapter(name, update, sent), weight)
    if name in SEED_STEP_RULES:
        message.content[SEEDS_KEY] = seeds_to_record(seed_steps_of(index))
        SeedSync.for_strategy(message, seed_steps_of(index))
    return message


def run_rounds(
    name: str,
    rounds: list[list[Update]],
    shuffle_seed: int | None = None,
    in_client_order: bool = True,
) -> Adapter:
    """Drive strategy ``name`` through ``rounds``; the global adapter after the last one.

    ``shuffle_seed`` shuffles the replies first (as arrival order would);
    ``in_client_order`` sorts them by client index again, as the round loop does.
    """
    strategy = build_strategy(
        name, dict(PARAMS.get(name, {})), population=len(NODES), clients_per_round=CLIENTS_PER_ROUND
    )
    adapter = GLOBAL
    for rnd, updates in enumerate(rounds, start=1):
        engine = SEED_STEP_RULES.get(name, SPEC["client.engine"])
        config = ConfigRecord({"round": rnd, **SPEC, "client.engine": engine})
        with seeded_global_random(0, rnd):
            sent = list(
                strategy.configure_train(rnd, to_record(adapter), config, NodeListGrid(NODES))
            )
        assert len(sent) == CLIENTS_PER_ROUND
        pairs = [(update[0], client_reply(name, update, adapter)) for update in updates]
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(pairs)
        if in_client_order:
            arrays = aggregate_in_client_order(strategy, rnd, pairs)
        else:
            arrays, _ = strategy.aggregate_train(rnd, [message for _, message in pairs])
        assert arrays is not None
        adapter = from_record(arrays)
    return adapter


def assert_adapter_like(out: Adapter, like: Adapter) -> None:
    """Same keys, shapes and dtype as the adapter sent, every value finite."""
    assert sorted(out) == sorted(like)
    for key in like:
        assert out[key].shape == like[key].shape, key
        assert out[key].dtype == like[key].dtype, key
        assert bool(torch.isfinite(out[key]).all()), key


def distance(a: Adapter, b: Adapter) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5)


@pytest.mark.parametrize("name", NAMES)
def test_declared_as_an_entry_point(name):
    declared = {ep.name: ep.value for ep in entry_points(group=GROUP)}
    assert declared.get(name) == BUILTINS[name], "pyproject and BUILTINS disagree (reinstall?)"


@pytest.mark.parametrize("name", NAMES)
def test_reply_order_does_not_change_the_aggregate(name):
    reference = run_rounds(name, [ROUND_1])
    assert_adapter_like(reference, GLOBAL)
    assert distance(reference, GLOBAL) > 0
    for seed in range(3):
        # Sorted by client index, as the loop does: bit for bit.
        sorted_again = run_rounds(name, [ROUND_1], shuffle_seed=seed)
        assert all(torch.equal(sorted_again[k], reference[k]) for k in GLOBAL)
        # Handed over in arrival order: the same up to float rounding.
        unsorted = run_rounds(name, [ROUND_1], shuffle_seed=seed, in_client_order=False)
        for key in GLOBAL:
            torch.testing.assert_close(unsorted[key], reference[key], rtol=1e-6, atol=1e-6)


def product(adapter: Adapter) -> torch.Tensor:
    """The weight update ``B @ A`` an adapter stands for."""
    return adapter["layers.0.q_proj.lora_B.weight"] @ adapter["layers.0.q_proj.lora_A.weight"]


@pytest.mark.parametrize("name", NAMES)
def test_a_single_reply(name):
    (update,) = _updates(3, [4])
    out = run_rounds(name, [[update]])
    assert_adapter_like(out, GLOBAL)
    # Whatever the rule, one client's update moves the global update B @ A towards the
    # client's (strategies that re-factor, FlexLoRA and FLoRA, change the factors but
    # not their product). A FLoRA reply is a fresh adapter trained on top of the global.
    target = product(client_adapter(name, update, GLOBAL))
    target = target + (product(GLOBAL) if name in DELTA_REPLIES else 0)
    assert (product(out) - target).norm() < (product(GLOBAL) - target).norm()


@pytest.mark.parametrize("name", NAMES)
def test_same_inputs_same_adapter(name):
    first = run_rounds(name, [ROUND_1, ROUND_2])
    second = run_rounds(name, [ROUND_1, ROUND_2])
    assert all(torch.equal(first[k], second[k]) for k in GLOBAL)


@pytest.mark.parametrize("name", NAMES)
def test_malformed_replies_are_dropped_before_aggregation(name):
    key_a, key_b = sorted(GLOBAL)
    wrong_shape = {**ROUND_1[0][1], key_a: torch.zeros(4, 9)}
    with_nan = {k: v.clone() for k, v in ROUND_1[1][1].items()}
    with_nan[key_b][0, 0] = float("nan")
    candidates = [*ROUND_1, (8, wrong_shape, 3), (9, with_nan, 3)]

    specs = expected_specs(GLOBAL)
    max_bytes = 4 * sum(v.numel() * 4 for v in GLOBAL.values())
    accepted: list[Update] = []
    reasons: list[str] = []
    for index, state, weight in candidates:
        update, reason = check_update(reply(state, weight), specs, max_bytes)
        if update is None:
            assert reason is not None
            reasons.append(reason)
        else:
            accepted.append((index, state, weight))

    assert [index for index, _, _ in accepted] == [index for index, _, _ in ROUND_1]
    assert reasons[0] == f"{key_a}: dtype and shape float32[4, 9], expected float32[4, 8]"
    assert reasons[1] == f"{key_b}: non-finite values"
    got, want = run_rounds(name, [accepted]), run_rounds(name, [ROUND_1])
    assert all(torch.equal(got[k], want[k]) for k in GLOBAL)
