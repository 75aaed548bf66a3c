"""The round loop's pure parts: aggregation order and seeded sampling."""

from __future__ import annotations

import random

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedtune.server.loop import aggregate_in_client_order, seeded_global_random
from fedtune.wire import from_record, to_record


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def reply(values: torch.Tensor, weight: int) -> Message:
    content = RecordDict(
        {"arrays": to_record({"w": values}), "metrics": MetricRecord({"num-examples": weight})}
    )
    return Message(content, dst_node_id=1, message_type="train")


def test_fedavg_exact_on_small_arrays():
    accepted = [(0, reply(torch.tensor([1.0, 2.0]), 1)), (1, reply(torch.tensor([4.0, 8.0]), 3))]
    out = from_record(aggregate_in_client_order(FedAvg(), 1, accepted))["w"]
    assert torch.equal(out, torch.tensor([3.25, 6.5]))


def test_reply_order_does_not_change_the_aggregate():
    gen = torch.Generator().manual_seed(0)
    accepted = [
        (i, reply(torch.randn(257, generator=gen) * 10 ** (i % 5), i + 1)) for i in range(12)
    ]
    reference = from_record(aggregate_in_client_order(FedAvg(), 1, accepted))["w"]
    rng = random.Random(1)
    for _ in range(5):
        shuffled = accepted[:]
        rng.shuffle(shuffled)
        got = from_record(aggregate_in_client_order(FedAvg(), 1, shuffled))["w"]
        assert torch.equal(got, reference)  # bit for bit


def test_seeded_sampling_is_a_function_of_seed_and_round():
    nodes = list(range(100))
    before = random.getstate()
    with seeded_global_random(7, 3):
        a = random.sample(nodes, 5)
    with seeded_global_random(7, 3):
        b = random.sample(nodes, 5)
    with seeded_global_random(7, 4):
        c = random.sample(nodes, 5)
    assert a == b and a != c
    assert random.getstate() == before  # the global generator is left as it was
