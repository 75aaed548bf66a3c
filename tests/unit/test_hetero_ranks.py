"""Heterogeneous LoRA ranks: the maths, FLoRA, HetLoRA and FlexLoRA by hand, the loop's
per-client downloads, the refusal of strategies that cannot mix ranks, and the client's
merge of a global adapter into its base weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.checks import check_federation
from fedtune.config import LoraConfig, StrategyConfig, load_scenario
from fedtune.errors import ConfigError, StrategyError
from fedtune.models import adapter_state, attach_lora, load_adapter_state, load_base_model
from fedtune.models.lora import merged_into_base, reset_adapter
from fedtune.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, RANK_KEY, WEIGHT_KEY, traits_of
from fedtune.server.fleet import Fleet
from fedtune.server.loop import aggregate_in_client_order
from fedtune.server.round import assign
from fedtune.strategies import build_strategy
from fedtune.strategies.lora_math import pad, product_norm, rank_of, refactor, stack, truncate
from fedtune.wire import from_record, to_record

from .node_grid import NodeListGrid, federation, task_identity

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
A2, B2 = "m.v_proj.lora_A.weight", "m.v_proj.lora_B.weight"
Adapter = dict[str, torch.Tensor]


@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


def adapter(rank: int, seed: int, d_in: int = 6, d_out: int = 5) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    return {
        A: torch.randn(rank, d_in, generator=gen),
        B: torch.randn(d_out, rank, generator=gen),
        A2: torch.randn(rank, d_in, generator=gen),
        B2: torch.randn(d_out, rank, generator=gen),
    }


def products(state: Adapter) -> list[torch.Tensor]:
    return [state[B].double() @ state[A].double(), state[B2].double() @ state[A2].double()]


def close(x: list[torch.Tensor], y: list[torch.Tensor], tol: float = 1e-5) -> bool:
    return all(torch.allclose(a, b, atol=tol, rtol=tol) for a, b in zip(x, y, strict=True))


# --- the maths ------------------------------------------------------------------------


def test_stacking_is_exactly_the_weighted_sum_of_products_for_any_ranks():
    one, two = adapter(1, 1), adapter(3, 2)
    stacked = stack([one, two], [0.25, 0.75])
    assert rank_of(stacked) == 4
    expected = [0.25 * p + 0.75 * q for p, q in zip(products(one), products(two), strict=True)]
    assert close(products(stacked), expected)


def test_refactor_is_exact_when_the_rank_fits_and_best_when_it_does_not():
    state = stack([adapter(2, 1), adapter(1, 2)], [0.5, 0.5])  # rank 3
    exact, error = refactor(state, 4)
    assert rank_of(exact) == 4 and error == 0.0
    assert torch.equal(exact[A][3], torch.zeros(6))  # zero-padded beyond the true rank
    assert close(products(exact), products(state))

    approx, error = refactor(state, 1)
    dense = products(state)
    best = []
    dropped = kept = 0.0
    for w in dense:  # the Eckart-Young best rank-1 approximation, by a dense SVD
        u, s, vh = torch.linalg.svd(w)
        best.append(s[0] * torch.outer(u[:, 0], vh[0]))
        dropped, kept = dropped + float((s[1:] ** 2).sum()), kept + float(s[0] ** 2)
    assert close(products(approx), best)
    assert error == pytest.approx((dropped / (dropped + kept)) ** 0.5, rel=1e-6)


def test_refactor_orders_components_and_truncation_keeps_the_strongest():
    state, _ = refactor(adapter(3, 5), 3)
    norms = [float(state[B][:, i].norm() * state[A][i].norm()) for i in range(3)]
    assert norms == sorted(norms, reverse=True)
    best_one, _ = refactor(state, 1)
    assert close(products(truncate(state, 1)), products(best_one))


def test_truncate_and_pad_are_inverse_on_the_kept_components():
    state = adapter(4, 3)
    assert all(torch.equal(truncate(pad(state, 6), 4)[k], state[k]) for k in state)
    padded = pad(truncate(state, 2), 4)
    assert torch.equal(padded[A][:2], state[A][:2]) and not padded[A][2:].any()
    assert torch.equal(padded[B][:, :2], state[B][:, :2]) and not padded[B][:, 2:].any()
    assert close(products(padded), products(truncate(state, 2)))


# --- the strategies -------------------------------------------------------------------


def reply(state: Adapter, weight: int) -> Message:
    content = RecordDict(
        {ARRAYS_KEY: to_record(state), METRICS_KEY: MetricRecord({WEIGHT_KEY: weight, "loss": 1.0})}
    )
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def one_round(name: str, sent: Adapter, replies: list[tuple[Adapter, int]], **params):
    strategy = build_strategy(name, params, population=4, clients_per_round=2)
    messages = list(
        strategy.configure_train(
            1, to_record(sent), ConfigRecord({"round": 1}), NodeListGrid([1, 2, 3, 4])
        )
    )
    accepted = [(i, reply(state, weight)) for i, (state, weight) in enumerate(replies)]
    return strategy, messages, from_record(aggregate_in_client_order(strategy, 1, accepted))


def test_flora_adds_the_stacked_client_updates_to_the_global_one():
    sent, low, high = adapter(4, 0), adapter(1, 1), adapter(2, 2)
    strategy, messages, out = one_round("flora", sent, [(low, 1), (high, 3)])
    assert traits_of(strategy).fresh_adapter  # clients merge the global adapter, train afresh
    assert rank_of(out) == 4
    # rank(global + updates) <= 4 + 1 + 2 > 4: the re-factorisation is the best rank 4
    expected = [
        g + 0.25 * p + 0.75 * q
        for g, p, q in zip(products(sent), products(low), products(high), strict=True)
    ]
    exact, _ = refactor(stack([sent, low, high], [1.0, 0.25, 0.75]), 7)
    assert close(products(exact), expected)
    assert close(products(out), products(refactor(exact, 4)[0]))
    assert strategy.last_error > 0
    # Every client merges the whole global adapter, whatever its own rank.
    assert strategy.download(to_record(sent), 1) is not None
    assert rank_of(from_record(strategy.download(to_record(sent), 1))) == 4


def test_flora_is_exact_while_the_stack_fits_the_global_rank():
    sent = {k: torch.zeros_like(v) for k, v in adapter(4, 0).items()}
    low, high = adapter(1, 1), adapter(2, 2)
    strategy, _, out = one_round("flora", sent, [(low, 1), (high, 3)])
    expected = [0.25 * p + 0.75 * q for p, q in zip(products(low), products(high), strict=True)]
    assert close(products(out), expected) and strategy.last_error < 1e-12


def test_hetlora_truncates_downloads_and_zero_pads_with_norm_weights():
    sent = adapter(2, 0)
    strategy = build_strategy("hetlora", {}, population=4, clients_per_round=2)
    down = from_record(strategy.download(to_record(sent), 1))
    assert torch.equal(down[A], sent[A][:1]) and torch.equal(down[B], sent[B][:, :1])

    low, high = adapter(1, 1), adapter(2, 2)
    _, _, out = one_round("hetlora", sent, [(low, 1), (high, 3)])
    w_low, w_high = product_norm(low), product_norm(high)
    p, q = w_low / (w_low + w_high), w_high / (w_low + w_high)
    assert torch.allclose(out[A][0], p * low[A][0] + q * high[A][0], atol=1e-6)
    assert torch.allclose(out[A][1], q * high[A][1], atol=1e-6)  # the low client has no row 1
    assert torch.allclose(out[B][:, 1], q * high[B][:, 1], atol=1e-6)

    _, _, by_examples = one_round("hetlora", sent, [(low, 1), (high, 3)], weighting="examples")
    assert torch.allclose(by_examples[A][0], 0.25 * low[A][0] + 0.75 * high[A][0], atol=1e-6)


def test_hetlora_rejects_an_unknown_weighting():
    with pytest.raises(StrategyError, match="weighting"):
        build_strategy("hetlora", {"weighting": "size"}, population=4, clients_per_round=2)


def test_flexlora_averages_products_and_downloads_the_best_truncation():
    sent, low, high = adapter(3, 0), adapter(1, 1), adapter(2, 2)
    strategy, _, out = one_round("flexlora", sent, [(low, 1), (high, 3)])
    expected = [0.25 * p + 0.75 * q for p, q in zip(products(low), products(high), strict=True)]
    assert close(products(out), expected) and strategy.last_error == 0.0  # rank 3 fits
    down = from_record(strategy.download(to_record(out), 1))
    assert close(products(down), products(refactor(out, 1)[0]))


# --- the loop and the fleet -----------------------------------------------------------


def fleet_scenario(tmp_path, strategy: str, ranks: tuple[int, int], tier_ranks: bool = True):
    tiers = tmp_path / "tiers.toml"
    tiers.write_text(
        "".join(
            f"[tiers.{name}]\nslowdown = 1\nmemory_mb = 9000\nuplink_mbps = 10\n"
            f"downlink_mbps = 10\navailability = 1\ndropout = 0\nlora_rank = {rank}\n\n"
            for name, rank in zip(("small", "big"), ranks, strict=True)
        )
    )
    return load_scenario(
        "tiny",
        [
            f"strategy.name={strategy!r}",
            "devices.enabled=true",
            f"devices.profiles={str(tiers)!r}",
            f"devices.tier_ranks={'true' if tier_ranks else 'false'}",
        ],
    )


def test_a_strategy_that_cannot_mix_ranks_is_refused_by_name(tmp_path):
    scenario = fleet_scenario(tmp_path, "fedavg", (2, 0))
    fleet = Fleet.from_scenario(scenario, 40)
    r = scenario.lora.r
    assert fleet.mixed_ranks(r) == {"small": 2}
    strategy = build_strategy("fedavg", {}, population=40, clients_per_round=2)
    with pytest.raises(ConfigError, match=r"'fedavg' cannot .* small \(rank 2\)"):
        check_federation(scenario, traits_of(strategy), 40, fleet.mixed_ranks(r))
    for name in ("flora", "hetlora", "flexlora"):
        ok = build_strategy(name, {}, population=40, clients_per_round=2)
        check_federation(
            replace(scenario, strategy=StrategyConfig(name)),
            traits_of(ok),
            40,
            fleet.mixed_ranks(r),
        )
    off = Fleet.from_scenario(fleet_scenario(tmp_path, "fedavg", (2, 0), tier_ranks=False), 40)
    assert off.mixed_ranks(r) == {}


def test_a_tier_rank_above_the_global_rank_is_a_config_error(tmp_path):
    scenario = fleet_scenario(tmp_path, "hetlora", (2, 64))
    with pytest.raises(ConfigError, match="'big' has lora_rank = 64 > lora.r"):
        Fleet.from_scenario(scenario, 40)


def test_assign_gives_a_client_of_a_smaller_tier_its_download_and_rank(tmp_path):
    sent = adapter(4, 0)
    scenario = replace(fleet_scenario(tmp_path, "hetlora", (2, 0)), lora=LoraConfig(r=4))
    fleet = Fleet.from_scenario(scenario, 40)
    small = fleet.client_tier.index("small")
    large = next(c for c, tier in enumerate(fleet.client_tier) if tier != "small")
    strategy = build_strategy("hetlora", {}, population=40, clients_per_round=2)
    fed = federation(strategy, scenario, {7: small, 8: large}, fleet=fleet, adapter=sent)
    messages = list(strategy.configure_train(1, to_record(sent), ConfigRecord({}), fed.grid))
    by_client = {a.client: a for a in assign(fed, 1, messages, sent)}
    first, second = by_client[small], by_client[large]
    assert (first.rank, second.rank) == (2, 4)
    assert first.message.metadata.dst_node_id == 7
    assert first.message.metadata.message_type == MessageType.TRAIN
    config = first.message.content.config_records[CONFIG_KEY]
    assert config[RANK_KEY] == 2 and config["round"] == 1
    assert rank_of(from_record(first.message.content.array_records[ARRAYS_KEY])) == 2
    # The global rank goes without a rank instruction, with the whole adapter.
    assert RANK_KEY not in second.message.content.config_records[CONFIG_KEY]
    assert rank_of(from_record(second.message.content.array_records[ARRAYS_KEY])) == 4
    # The strategy's own messages (which share one content) are untouched.
    assert all(rank_of(from_record(m.content.array_records[ARRAYS_KEY])) == 4 for m in messages)


# --- the client side ------------------------------------------------------------------


def test_tier_ranks_keep_the_adapter_scale():
    lora = LoraConfig(r=8, alpha=16)
    small = attach_lora(load_base_model("tiny-llama"), lora, seed=0, rank=2)
    layer = small.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.r["default"] == 2 and layer.scaling["default"] == pytest.approx(2.0)
    assert rank_of(adapter_state(small)) == 2


def test_merging_the_global_adapter_then_a_fresh_one_computes_the_same_model():
    lora = LoraConfig(r=4, alpha=8)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    model = attach_lora(load_base_model("tiny-llama"), lora, seed=0)
    trained = {k: torch.randn_like(v) * 0.1 for k, v in adapter_state(model).items()}
    load_adapter_state(model, trained)
    with torch.no_grad():
        reference = model(input_ids=ids).logits

    fresh = attach_lora(load_base_model("tiny-llama"), lora, seed=0, rank=2)
    weights = {n: p.detach().clone() for n, p in fresh.named_parameters() if "lora_" not in n}
    with merged_into_base(fresh, trained, lora.alpha / lora.r):
        reset_adapter(fresh, seed=3)
        assert all(not v.any() for k, v in adapter_state(fresh).items() if "lora_B" in k)
        with torch.no_grad():
            merged = fresh(input_ids=ids).logits
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=1e-5)
    # The base weights come back exactly.
    after = {n: p for n, p in fresh.named_parameters() if "lora_" not in n}
    assert all(torch.equal(after[n], weights[n]) for n in weights)


def test_reset_adapter_is_seeded():
    model = attach_lora(load_base_model("tiny-llama"), LoraConfig(r=4, alpha=8), seed=0)
    reset_adapter(model, seed=5)
    first = adapter_state(model)
    reset_adapter(model, seed=6)
    assert not all(torch.equal(first[k], v) for k, v in adapter_state(model).items())
    reset_adapter(model, seed=5)
    assert all(torch.equal(first[k], v) for k, v in adapter_state(model).items())
