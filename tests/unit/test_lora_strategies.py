"""FFA-LoRA and FedSA-LoRA on the server: what they send, what they aggregate, what they keep."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.checkpoint import restore_strategy_state, strategy_state
from fedtune.protocol import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY, traits_of
from fedtune.server.loop import aggregate_in_client_order
from fedtune.strategies import build_strategy
from fedtune.strategies.ffa_lora import FfaLora
from fedtune.wire import from_record, to_record

from .node_grid import NodeListGrid, task_identity

A, B = "layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight"
SENT = {A: torch.tensor([[1.0, 2.0]]), B: torch.tensor([[0.0], [0.0]])}
# (client index, adapter, num-examples); values chosen so the averages are exact.
REPLIES = [
    (0, {A: torch.tensor([[5.0, 6.0]]), B: torch.tensor([[1.0], [2.0]])}, 1),
    (1, {A: torch.tensor([[9.0, 2.0]]), B: torch.tensor([[3.0], [-2.0]])}, 3),
]
AVG_A = torch.tensor([[8.0, 3.0]])  # (1 * [5, 6] + 3 * [9, 2]) / 4
AVG_B = torch.tensor([[2.5], [-1.0]])  # (1 * [1, 2] + 3 * [3, -2]) / 4


@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


def reply(state: dict[str, torch.Tensor], weight: int) -> Message:
    content = RecordDict(
        {ARRAYS_KEY: to_record(state), METRICS_KEY: MetricRecord({WEIGHT_KEY: weight, "loss": 1.0})}
    )
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def one_round(name: str, strategy=None):
    strategy = strategy or build_strategy(name, {}, population=4, clients_per_round=2)
    sent = list(
        strategy.configure_train(
            1, to_record(SENT), ConfigRecord({"round": 1}), NodeListGrid([11, 12, 13, 14])
        )
    )
    accepted = [(index, reply(state, weight)) for index, state, weight in REPLIES]
    return strategy, sent, from_record(aggregate_in_client_order(strategy, 1, accepted))


def test_ffa_lora_asks_clients_to_train_only_b():
    _, sent, _ = one_round("ffa-lora")
    assert len(sent) == 2
    assert traits_of(build_strategy("ffa-lora", {}, 4, 2)).trains == "B"


def test_ffa_lora_averages_b_and_returns_a_as_sent():
    _, _, out = one_round("ffa-lora")
    assert torch.equal(out[A], SENT[A])  # whatever the clients replied
    assert torch.equal(out[B], AVG_B)


def test_ffa_lora_keeps_a_over_rounds_and_through_a_checkpoint():
    strategy, _, first = one_round("ffa-lora")
    restored = FfaLora()
    restore_strategy_state(restored, strategy_state(strategy))
    assert restored.sent_arrays is not None
    assert torch.equal(from_record(restored.sent_arrays)[A], SENT[A])
    _, _, second = one_round("ffa-lora", strategy=restored)
    assert torch.equal(second[A], first[A])


def test_ffa_lora_without_a_configured_round_or_replies_gives_nothing():
    strategy = build_strategy("ffa-lora", {}, population=4, clients_per_round=2)
    assert strategy.aggregate_train(1, [reply(REPLIES[0][1], 1)]) == (None, None)
    one_round("ffa-lora", strategy=strategy)
    assert strategy.aggregate_train(2, []) == (None, None)


def test_fedsa_lora_asks_clients_to_keep_b():
    _, sent, _ = one_round("fedsa-lora")
    traits = traits_of(build_strategy("fedsa-lora", {}, 4, 2))
    assert traits.keeps_local == "B" and traits.trains == "all"
    assert not traits.replays_on_sent  # so zeroth clients are refused before round 1


def test_fedsa_lora_averages_a_and_returns_the_average_b_for_evaluation():
    _, _, out = one_round("fedsa-lora")
    assert torch.equal(out[A], AVG_A)
    assert torch.equal(out[B], AVG_B)


def test_fedsa_lora_global_adapter_equals_fedavg_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    replies = [
        (i, {A: torch.randn(4, 8, generator=gen), B: torch.randn(8, 4, generator=gen)}, 2 + i)
        for i in range(5)
    ]
    outs = []
    for name in ("fedsa-lora", "fedavg"):
        strategy = build_strategy(name, {}, population=5, clients_per_round=5)
        accepted = [(i, reply(s, w)) for i, s, w in replies]
        outs.append(from_record(aggregate_in_client_order(strategy, 1, accepted)))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in (A, B))
