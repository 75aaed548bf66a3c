"""Differential privacy: clipping, noise, the accountant against dp-accounting, the
budget, the wrapper around FedAvg and FFA-LoRA, the client's mod, the config."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAvg

from fedtune.checkpoint import restore_strategy_state, strategy_state
from fedtune.checks import check_federation
from fedtune.config import load_scenario
from fedtune.errors import ConfigError
from fedtune.privacy.accounting import Accountant
from fedtune.privacy.clipping import (
    SecureNoise,
    add_noise,
    clip,
    l2_norm,
    next_clip,
    privatize_seed_steps,
    secret_generator,
)
from fedtune.privacy.mod import privacy_mod
from fedtune.protocol import (
    ARRAYS_KEY,
    CLIP_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NOISE_KEY,
    TRAIN_KEY,
    WEIGHT_KEY,
    traits_of,
)
from fedtune.strategies import build_strategy
from fedtune.strategies.ffa_lora import FfaLora
from fedtune.strategies.private import AdaptiveClipping, PrivateAggregation, wrap_private
from fedtune.wire import from_record, to_record

from .node_grid import NodeListGrid, task_identity

A, B = "m.v_proj.lora_A.weight", "m.v_proj.lora_B.weight"
SENT = {A: torch.tensor([[1.0, -1.0, 2.0]]), B: torch.zeros(2, 1)}
NODES = [11, 12, 13, 14, 15, 16]


@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


def update_of(node: int, norm: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(node)
    update = {k: torch.randn(v.shape, generator=generator) for k, v in SENT.items()}
    return {k: v * norm / l2_norm(update) for k, v in update.items()}


# --------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("norm", [1e-8, 0.5, 0.999999, 1.0, 1.000001, 3.0, 1e6])
def test_every_clipped_update_has_norm_within_the_bound(norm):
    for seed in range(20):
        update = update_of(seed, norm)
        clipped, within = clip(update, 1.0)
        assert l2_norm(clipped) <= 1.0
        assert within == (l2_norm(update) <= 1.0)
        if within:  # an update within the bound is left exactly as it was
            assert all(torch.equal(clipped[k], update[k]) for k in update)


def test_noise_has_the_asked_standard_deviation_and_fresh_keys():
    zeros = {"x": torch.zeros(100_000)}
    noisy = add_noise(zeros, 0.5, secret_generator())["x"]
    assert abs(noisy.std().item() - 0.5) < 0.01 and abs(noisy.mean().item()) < 0.01
    assert not torch.equal(noisy, add_noise(zeros, 0.5, secret_generator())["x"])


def test_the_noise_source_is_a_chacha20_stream_and_seedable_only_on_purpose():
    from scipy import stats

    # Normal by a Kolmogorov-Smirnov test, and the same stream for the same test seed.
    sample = SecureNoise(seed=7).normal((4001,)).numpy()
    assert stats.kstest(sample, "norm").pvalue > 1e-3
    assert np.array_equal(sample, SecureNoise(seed=7).normal((4001,)).numpy())
    assert not np.array_equal(sample, SecureNoise(seed=8).normal((4001,)).numpy())
    # Uniforms are 53-bit floats strictly inside (0, 1): log(u) is always finite.
    uniforms = SecureNoise().uniform(100_000)
    assert 0.0 < uniforms.min() and uniforms.max() < 1.0


def test_adaptive_bound_grows_when_updates_are_clipped_and_shrinks_when_not():
    # Andrew et al.: the fraction *within* the bound is compared with the target.
    assert next_clip(1.0, 0.0, 0.5, 0.2) == pytest.approx(math.exp(0.1))
    assert next_clip(1.0, 1.0, 0.5, 0.2) == pytest.approx(math.exp(-0.1))
    assert next_clip(1.0, 0.5, 0.5, 0.2) == 1.0


def test_seed_only_updates_clip_and_noise_their_scalars():
    steps = [(7, 3.0), (2, -4.0), (7, 0.0)]  # norm 5
    (i0, g0), (i1, g1), (i2, g2) = privatize_seed_steps(steps, 1.0, 1e-9, secret_generator())
    assert (i0, i1, i2) == (7, 2, 7)  # which seeds were used is not data
    assert math.hypot(g0, g1, g2) <= 1.0 + 1e-6
    assert (g0, g1) == pytest.approx((0.6, -0.8), abs=1e-5)


# ------------------------------------------------------------------------- accounting


def independent_epsilon(sigma: float, population: int, sample: int, rounds: int, delta: float):
    """dp-accounting, called directly: the subsampled Gaussian without replacement under
    replace-one, whose sensitivity for updates clipped to C is 2C (multiplier sigma / 2)."""
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        population, sample, dp_accounting.GaussianDpEvent(sigma / 2)
    )
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    ("sigma", "population", "sample", "rounds"), [(1.0, 100, 10, 5), (2.5, 1000, 20, 30)]
)
def test_epsilon_matches_an_independent_dp_accounting_computation(
    sigma, population, sample, rounds
):
    accountant = Accountant(sigma, 1e-5)
    for _ in range(rounds):
        accountant.spend(population, sample, [])
    expected = independent_epsilon(sigma, population, sample, rounds, 1e-5)
    assert accountant.epsilon() == pytest.approx(expected, rel=0.01)
    assert accountant.released == rounds


def test_local_epsilon_counts_the_most_frequent_client_without_amplification():
    accountant = Accountant(2.0, 1e-5, local=True)
    accountant.spend(10, 2, [1, 2])
    accountant.spend(10, 2, [1, 3])
    gaussian = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    gaussian.compose(dp_accounting.GaussianDpEvent(1.0), 2)
    assert accountant.released == 2
    assert accountant.epsilon() == pytest.approx(gaussian.get_epsilon(1e-5), rel=1e-9)


# ------------------------------------------------------------------- the wrapper, central


class Recording(FedAvg):
    def __init__(self) -> None:
        super().__init__(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
        self.calls: list[list[Message]] = []

    def aggregate_train(self, server_round, replies):
        self.calls.append(list(replies))
        return super().aggregate_train(server_round, self.calls[-1])


def replies_to(messages: list[Message], norms: dict[int, float]) -> list[Message]:
    replies = []
    for message in messages:
        node = message.metadata.dst_node_id
        update = update_of(node, norms[node])
        adapter = {k: SENT[k] + update[k] for k in SENT}
        content = RecordDict(
            {ARRAYS_KEY: to_record(adapter), METRICS_KEY: MetricRecord({WEIGHT_KEY: 4})}
        )
        replies.append(Message(content, reply_to=message))
    return replies


def central(inner=None, **kwargs) -> PrivateAggregation:
    settings = dict(mode="central", clip=1.0, mean_over=6, noise_multiplier=1.0, delta=1e-3)
    return PrivateAggregation(inner or Recording(), **{**settings, **kwargs})


def one_round(strategy, rnd: int = 1, norms=None):
    grid = NodeListGrid(NODES)
    messages = list(strategy.configure_train(rnd, to_record(SENT), ConfigRecord({}), grid))
    norms = norms or {n: 0.5 * (n - 10) for n in NODES}  # 0.5 to 3.0: half are clipped
    arrays, _ = strategy.aggregate_train(rnd, replies_to(messages, norms))
    return messages, from_record(arrays)


def test_central_dp_is_the_clipped_sum_plus_noise_over_the_fixed_denominator():
    strategy = central(noise_multiplier=1e-9)  # noise too small to see: the sum shows
    messages, out = one_round(strategy)
    assert all(CLIP_KEY not in m.content.config_records[CONFIG_KEY] for m in messages)
    clipped = [clip(update_of(n, 0.5 * (n - 10)), 1.0)[0] for n in NODES]
    for k in SENT:
        assert torch.allclose(out[k], SENT[k] + sum(c[k] for c in clipped) / 6, atol=1e-6)
    # The inner strategy saw one reply: the private mean, weight 1.
    (seen,) = strategy.strategy.calls
    assert len(seen) == 1 and seen[0].content[METRICS_KEY][WEIGHT_KEY] == 1


def test_ffa_lora_under_central_dp_keeps_a_exactly_and_noises_only_b():
    inner = build_strategy("ffa-lora", {}, population=6, clients_per_round=6)
    assert isinstance(inner, FfaLora)
    messages, out = one_round(central(inner, noise_multiplier=5.0))
    assert traits_of(inner).trains == "B"  # the wrapper keeps only B's noise
    assert torch.equal(out[A], SENT[A])
    assert not torch.equal(out[B], SENT[B])


def test_the_over_budget_round_is_refused_before_training_and_aggregation():
    eps_one = independent_epsilon(1.0, 6, 6, 1, 1e-3)
    eps_two = independent_epsilon(1.0, 6, 6, 2, 1e-3)
    strategy = central(max_epsilon=(eps_one + eps_two) / 2, population=6, sample_size=6)
    one_round(strategy, 1)
    assert strategy.round_fields()["epsilon"] == pytest.approx(eps_one, rel=0.01)
    with pytest.raises(PrivacyBudgetExhausted, match="privacy.max_epsilon"):
        strategy.configure_train(2, to_record(SENT), ConfigRecord({}), NodeListGrid(NODES))
    assert len(strategy.strategy.calls) == 1  # round 2 never reached aggregation
    summary = strategy.privacy_summary()
    assert summary["refused_round"] == 2 and summary["rounds"] == 1
    assert summary["sampling"] == "without_replacement" and summary["sampling_rate"] == 1.0


def test_adaptive_clipping_raises_the_bound_when_every_update_is_clipped():
    adaptive = AdaptiveClipping(target_quantile=0.5, lr=0.2, count_std=0.6)
    strategy = central(noise_multiplier=1.0, clip=0.01, adaptive=adaptive)
    assert strategy.update_noise > strategy.noise_multiplier  # the count takes a share
    for rnd in (1, 2, 3):
        one_round(strategy, rnd, norms={n: 50.0 for n in NODES})
    assert strategy.clip > 0.01 * math.exp(0.1)  # three steps up of ~exp(0.1) each, noisy
    assert strategy.round_fields()["clip"] == strategy.clip


def test_state_round_trips_through_a_checkpoint():
    strategy = central()
    one_round(strategy)
    state = strategy_state(strategy)
    fresh = central()
    restore_strategy_state(fresh, state)
    assert fresh.accountant.rounds == strategy.accountant.rounds
    assert fresh.round_fields()["epsilon"] == strategy.round_fields()["epsilon"]


# ------------------------------------------------------------------ the client's mod

client = ClientApp()


@client.train(mods=[privacy_mod])
def train(message: Message, context: Context) -> Message:
    received = from_record(message.content.array_records[ARRAYS_KEY])
    update = update_of(message.metadata.dst_node_id, 3.0)
    trained = {k: received[k] + update[k] for k in received}
    content = RecordDict(
        {ARRAYS_KEY: to_record(trained), METRICS_KEY: MetricRecord({WEIGHT_KEY: 4})}
    )
    return Message(content, reply_to=message)


@pytest.mark.parametrize("train_only", ["all", "B"])
def test_local_mode_releases_a_clipped_update_of_the_trained_factors(train_only):
    config = {CLIP_KEY: 0.5, NOISE_KEY: 0.0, TRAIN_KEY: train_only, "client.wire_dtype": "fp32"}
    message = Message(
        RecordDict({ARRAYS_KEY: to_record(SENT), CONFIG_KEY: ConfigRecord(config)}),
        dst_node_id=12,
        message_type="train",
    )
    reply = client(message, Context(1, 12, {}, RecordDict(), {}))
    released = from_record(reply.content.array_records[ARRAYS_KEY])
    update = {k: released[k] - SENT[k] for k in SENT}
    assert l2_norm(update) <= 0.5
    if train_only == "B":
        assert torch.equal(released[A], SENT[A])


def test_local_mode_asks_clients_to_noise_and_aggregates_their_replies():
    strategy = PrivateAggregation(
        Recording(), mode="local", clip=0.5, mean_over=6, noise_multiplier=2.0
    )
    messages, _ = one_round(strategy)
    config = messages[0].content.config_records[CONFIG_KEY]
    assert config[CLIP_KEY] == 0.5 and config[NOISE_KEY] == 2.0
    assert len(strategy.strategy.calls[0]) == len(NODES)  # local DP: replies go through
    assert strategy.accountant.released == 1


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ('privacy.mode="laplace"', "privacy.mode"),
        ("privacy.clip=0", "privacy.clip"),
        ("privacy.target_delta=1.5", "privacy.target_delta"),
        ("privacy.adaptive=true", "privacy.adaptive"),  # mode none
        ("privacy.secagg_neighbours=3", "privacy.secagg_neighbours"),
        ("privacy.noisemultiplier=1.0", "privacy.noise_multiplier"),  # did you mean
    ],
)
def test_bad_privacy_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_scenario("tiny", [override])


def test_local_dp_does_not_combine_with_secure_aggregation():
    with pytest.raises(ConfigError, match="privacy.secure_aggregation"):
        load_scenario("tiny", ['privacy.mode="local"', "privacy.secure_aggregation=true"])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (['strategy.name="median"'], "median"),
        (["privacy.secure_aggregation=true", 'client.wire_dtype="int8"'], "client.wire_dtype"),
        (["privacy.target_delta=0.5"], "privacy.target_delta"),
        (["privacy.adaptive=true", "privacy.noise_multiplier=1.0"], "privacy.count_noise"),
    ],
)
def test_settings_that_contradict_another_section_are_refused(overrides, key):
    scenario = load_scenario("tiny", ['privacy.mode="central"', *overrides])
    strategy = build_strategy(scenario.strategy.name, {}, population=6, clients_per_round=3)
    with pytest.raises(ConfigError, match=key):
        check_federation(scenario, traits_of(strategy), population=6, mixed_ranks={})


def test_no_privacy_section_wraps_nothing():
    scenario = load_scenario("tiny")
    assert wrap_private(FedAvg(), scenario, population=6) is None
