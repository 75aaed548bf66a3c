"""Secure aggregation: Flower's real crypto, real Messages, an in-process grid.

Every node runs a real Flower ClientApp with fedtune's privacy mod and secure-aggregation
handler; only local training is replaced by a known update, so the plaintext sum is known.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fedtune.privacy.clipping import clip
from fedtune.privacy.mod import privacy_mod
from fedtune.privacy.secagg import ACTION, MODULUS, RECORD, handle_stage
from fedtune.protocol import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY
from fedtune.strategies.private import PrivateAggregation, SecureAggregation
from fedtune.wire import from_record, to_record

from .node_grid import NodeListGrid, task_identity

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
SENT = {A: torch.full((2, 6), 0.5), B: torch.zeros(5, 2)}
NODES = [101, 102, 103, 104, 105, 106, 107, 108]
BOUND = 1.0


def known_update(node: int) -> dict[str, torch.Tensor]:
    """Node ``node``'s update: norms from 0.3 to 2.4, so some are clipped and some not."""
    generator = torch.Generator().manual_seed(node)
    update = {k: torch.randn(v.shape, generator=generator) for k, v in SENT.items()}
    norm = torch.cat([v.flatten() for v in update.values()]).norm()
    return {k: v * (0.3 * (node - 100)) / norm for k, v in update.items()}


app = ClientApp()


@app.train(mods=[privacy_mod])
def train(message: Message, context: Context) -> Message:
    received = from_record(message.content.array_records[ARRAYS_KEY])
    update = known_update(message.metadata.dst_node_id)
    trained = {k: received[k] + update[k] for k in received}
    metrics = MetricRecord({WEIGHT_KEY: 4, "loss": 1.0})
    return Message(
        RecordDict({ARRAYS_KEY: to_record(trained), METRICS_KEY: metrics}), reply_to=message
    )


@app.query(ACTION)
def secagg(message: Message, context: Context) -> Message:
    return handle_stage(message, context)


class LoopbackGrid(NodeListGrid):
    """Delivers each message to the ClientApp above, with one Context per node."""

    def __init__(self, node_ids: list[int]) -> None:
        super().__init__(node_ids)
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in node_ids}
        self.silent: set[int] = set()
        """Nodes that have gone away: they answer nothing."""

    def deliver(self, message: Message) -> Message:
        """The node's reply; an exception becomes an error reply, as Flower makes it."""
        try:
            return app(message, self.contexts[message.metadata.dst_node_id])
        except ValueError as exc:
            return Message(Error(code=0, reason=str(exc)), reply_to=message)

    def send_and_receive(self, messages, *, timeout=None):
        return [self.deliver(m) for m in messages if m.metadata.dst_node_id not in self.silent]


class RecordingFedAvg(FedAvg):
    """Flower's FedAvg that keeps every reply it is given."""

    def __init__(self) -> None:
        super().__init__(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
        self.received: list[Message] = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.received.extend(replies)
        return super().aggregate_train(server_round, replies)


@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


def wrapper(mode: str = "none", threshold: float = 0.6) -> PrivateAggregation:
    return PrivateAggregation(
        RecordingFedAvg(),
        mode=mode,
        clip=BOUND,
        mean_over=len(NODES),
        noise_multiplier=1.0,
        delta=1e-3,
        population=len(NODES),
        sample_size=len(NODES),
        secure=SecureAggregation(neighbours=0, threshold=threshold),
    )


def run_round(strategy: PrivateAggregation, grid: LoopbackGrid, drop_after_keys: set[int]):
    """One round: key sharing with everyone, then ``drop_after_keys`` go silent."""
    config = ConfigRecord({"client.wire_dtype": "fp32"})
    messages = list(strategy.configure_train(1, to_record(SENT), config, grid))
    grid.silent |= drop_after_keys
    replies = [grid.deliver(m) for m in messages if m.metadata.dst_node_id not in grid.silent]
    return messages, replies, strategy.aggregate_train(1, replies)


def test_aggregate_is_the_survivors_sum_and_no_single_update_is_seen():
    strategy, grid = wrapper(), LoopbackGrid(NODES)
    dropped = {102, 107}
    messages, replies, (arrays, _) = run_round(strategy, grid, dropped)
    assert len(messages) == 8 and len(replies) == 6
    assert all(RECORD in m.content.config_records for m in messages)

    survivors = [n for n in NODES if n not in dropped]
    clipped = [clip(known_update(n), BOUND)[0] for n in survivors]
    plain_sum = {k: sum(c[k] for c in clipped) for k in SENT}
    # Secure aggregation alone (no DP): the strategy gets the survivors' mean.
    out = from_record(arrays)
    step = 2 * BOUND / strategy.secagg.levels  # one quantization level
    for k in SENT:
        error = (out[k] - SENT[k]) * len(survivors) - plain_sum[k]
        assert error.abs().max() <= len(survivors) * step  # stochastic rounding: < 1 step each

    # The inner strategy received one reply, and it is the aggregate.
    inner = strategy.strategy
    assert len(inner.received) == 1
    assert inner.received[0].content[METRICS_KEY][WEIGHT_KEY] == 1
    # What reached the server from each client is masked: integers mod 2^24, nowhere
    # near that client's adapter.
    for reply in replies:
        masked = from_record(reply.content.array_records[ARRAYS_KEY])
        mine = known_update(reply.metadata.src_node_id)
        for k in SENT:
            values = masked[k].double()
            assert torch.equal(values, values.round()) and 0 <= values.min() < MODULUS
            assert (values - (SENT[k] + mine[k]).double()).abs().mean() > 1e5


def test_a_node_silent_from_the_start_is_left_out_of_the_masks():
    strategy, grid = wrapper(), LoopbackGrid(NODES)
    grid.silent.add(105)
    messages, replies, (arrays, _) = run_round(strategy, grid, set())
    assert sorted(m.metadata.dst_node_id for m in messages) == [n for n in NODES if n != 105]
    clipped = [clip(known_update(n), BOUND)[0] for n in NODES if n != 105]
    out = from_record(arrays)
    expected = SENT[B] + sum(c[B] for c in clipped) / 7
    assert torch.allclose(out[B], expected, atol=1e-5)


def test_too_many_dropouts_abandon_the_round_without_spending_privacy():
    strategy, grid = wrapper(mode="central", threshold=0.9), LoopbackGrid(NODES)  # t = 8 of 8
    _, replies, (arrays, _) = run_round(strategy, grid, {101})
    assert len(replies) == 7 and arrays is None
    assert strategy.strategy.received == []
    assert strategy.accountant.released == 0


def test_central_dp_adds_noise_to_the_secure_sum_and_keeps_the_fixed_denominator():
    strategy, grid = wrapper(mode="central"), LoopbackGrid(NODES)
    _, _, (arrays, _) = run_round(strategy, grid, {103})
    clipped = [clip(known_update(n), BOUND)[0] for n in NODES if n != 103]
    noiseless = {k: SENT[k] + sum(c[k] for c in clipped) / len(NODES) for k in SENT}
    noise = {k: (from_record(arrays)[k] - noiseless[k]) * len(NODES) for k in SENT}
    values = torch.cat([v.flatten() for v in noise.values()])
    # N(0, (sigma C)^2) on the sum, sigma = C = 1: 22 draws, far from 0 and from 10.
    assert 0.3 < values.std().item() < 2.5
    assert strategy.accountant.released == 1
    assert np.isfinite(strategy.round_fields()["epsilon"])
