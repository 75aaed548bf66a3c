"""Each aggregation rule on tiny tensors, against the answer worked out by hand.

Five replies of one 1x3 tensor; the third is an outlier (an attacker's update). The
rules are built by name and driven as the round loop drives them.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.protocol import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY
from fedtune.server.loop import aggregate_in_client_order
from fedtune.strategies import build_strategy
from fedtune.wire import from_record, to_record

from .node_grid import NodeListGrid, task_identity

KEY = "layers.0.q_proj.lora_A.weight"
SENT = torch.tensor([[0.0, 0.0, 0.0]])
VALUES = [
    [1.0, 2.0, 3.0],
    [2.0, 1.0, 4.0],
    [100.0, -100.0, 50.0],  # the outlier
    [3.0, 3.0, 2.0],
    [4.0, 2.0, 2.0],
]
WEIGHTS = [1, 1, 2, 3, 3]


@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


def aggregate(name: str, params: dict | None = None, rounds: int = 1, sent=SENT) -> torch.Tensor:
    strategy = build_strategy(name, params or {}, population=5, clients_per_round=5)
    adapter = {KEY: sent}
    for rnd in range(1, rounds + 1):
        list(
            strategy.configure_train(
                rnd, to_record(adapter), ConfigRecord({}), NodeListGrid(range(1, 6))
            )
        )
        replies = [
            (
                i,
                Message(
                    RecordDict(
                        {
                            ARRAYS_KEY: to_record({KEY: torch.tensor([v])}),
                            METRICS_KEY: MetricRecord({WEIGHT_KEY: w, "loss": 1.0}),
                        }
                    ),
                    dst_node_id=1,
                    message_type=MessageType.TRAIN,
                ),
            )
            for i, (v, w) in enumerate(zip(VALUES, WEIGHTS, strict=True))
        ]
        adapter = from_record(aggregate_in_client_order(strategy, rnd, replies))
    return adapter[KEY][0]


def expect(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_fedavg_weighted_mean():
    # (1*[1,2,3] + 1*[2,1,4] + 2*[100,-100,50] + 3*[3,3,2] + 3*[4,2,2]) / 10
    torch.testing.assert_close(aggregate("fedavg"), expect([22.4, -18.2, 11.9]))


def test_median_coordinate_wise_ignores_the_outlier():
    # sorted columns: [1,2,3,4,100], [-100,1,2,2,3], [2,2,3,4,50]
    assert torch.equal(aggregate("median"), expect([3.0, 2.0, 3.0]))


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    # beta = 0.2 of 5 replies: one cut at each end, then the plain mean of three
    out = aggregate("trimmed-mean", {"beta": 0.2})
    torch.testing.assert_close(out, expect([(2 + 3 + 4) / 3, (1 + 2 + 2) / 3, (2 + 3 + 4) / 3]))


def test_krum_picks_the_reply_closest_to_its_neighbours():
    # n = 5, f = 1: score = sum of squared distances to the n - f - 2 = 2 nearest.
    points = torch.tensor(VALUES)
    d = torch.cdist(points, points) ** 2
    scores = [float(row.sort().values[1:3].sum()) for row in d]
    best = min(range(5), key=lambda i: scores[i])
    assert best == 3  # by hand: squared distances 3->4 = 2, 3->0 = 6; score 8, the lowest
    assert torch.equal(aggregate("krum", {"num_malicious_nodes": 1}), points[best])


def test_fedavgm_steps_with_momentum_over_two_rounds():
    mean = expect([22.4, -18.2, 11.9])
    # round 1: g1 = 0 - mean, v1 = g1, w1 = -v1 = mean
    # round 2: g2 = w1 - mean = 0, v2 = 0.5 * v1 + g2, w2 = w1 - v2 = mean + 0.5 * mean
    out = aggregate("fedavgm", {"server_momentum": 0.5}, rounds=2)
    torch.testing.assert_close(out, 1.5 * mean)


def test_fedadam_first_step():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    delta = expect([22.4, -18.2, 11.9])  # the weighted mean minus the zeros sent
    m, v = (1 - b1) * delta, (1 - b2) * delta**2
    eta_norm = eta * math.sqrt(1 - b2**2) / (1 - b1**2)
    out = aggregate("fedadam", {"eta": eta, "beta_1": b1, "beta_2": b2, "tau": tau})
    torch.testing.assert_close(out, eta_norm * m / (v.sqrt() + tau))
