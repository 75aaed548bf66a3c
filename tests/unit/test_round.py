"""One round's steps against hostile replies: a client's claimed example count never
sets its weight, huge or outlying updates are rejected with the reason while the round
aggregates the others, and a non-finite aggregate abandons the round."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedtune.config import client_spec, load_scenario
from fedtune.metrics import EventLog, read_events
from fedtune.protocol import ARRAYS_KEY, METRICS_KEY, TrainReport
from fedtune.server import round as steps
from fedtune.server.loop import _aggregate
from fedtune.strategies import build_strategy
from fedtune.wire import from_record, to_record

from .node_grid import federation, task_identity

ADAPTER = {"m.lora_A.weight": torch.ones(8, 64), "m.lora_B.weight": torch.zeros(64, 8)}
NODES = {10 + i: i for i in range(6)}
ASSIGNED = 2 * 2  # tiny: client.local_steps x client.batch_size


@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


def setup(*overrides: str):
    scenario = load_scenario("tiny", ["round.clients_per_round=6", *overrides])
    strategy = build_strategy("fedavg", {}, population=6, clients_per_round=6)
    fed = federation(strategy, scenario, NODES, adapter=ADAPTER)
    sampled = steps.sample(fed, 1, ADAPTER, client_spec(scenario))
    return fed, steps.assign(fed, 1, sampled, ADAPTER)


def reply(assignment, delta: float, num_examples: int = ASSIGNED) -> Message:
    """What a client would send: the adapter it got, B moved by ``delta``."""
    state = {k: v.clone() for k, v in ADAPTER.items()}
    state["m.lora_B.weight"] += delta
    report = TrainReport(num_examples, 1.0, 0.1, 0.1, 100.0, assignment.client, 1)
    content = RecordDict({ARRAYS_KEY: to_record(state), METRICS_KEY: report.to_metrics()})
    return Message(content, reply_to=assignment.message)


def run_round(fed, assignments, replies, tmp_path):
    judged = [
        steps.judge(fed, 1, a, r, ADAPTER, 1.0) for a, r in zip(assignments, replies, strict=True)
    ]
    steps.bound_updates(fed, judged, ADAPTER)
    with EventLog(tmp_path / "metrics.jsonl") as events:
        tally = steps.record(fed, 1, judged, events, lambda *_: None)
    events = list(read_events(tmp_path / "metrics.jsonl", "client_update"))
    return judged, tally, {e["client"]: e for e in events}


def b_of(tally) -> torch.Tensor:
    arrays = steps.aggregate_in_client_order(FedAvg(), 1, tally.accepted)
    return from_record(arrays)["m.lora_B.weight"]


def test_a_claimed_example_count_never_sets_the_weight(tmp_path):
    fed, assignments = setup()
    replies = [reply(a, 0.01 * (i + 1)) for i, a in enumerate(assignments)]
    replies[0] = reply(assignments[0], 0.01, num_examples=10**12)  # "I trained on everything"
    _, tally, events = run_round(fed, assignments, replies, tmp_path)
    liar = events[assignments[0].client]
    assert liar["status"] == "ok" and liar["num_examples"] == ASSIGNED
    assert liar["reported_num_examples"] == 10**12  # recorded, not trusted
    # Equal server-assigned weights: the plain mean of 0.01 .. 0.06.
    torch.testing.assert_close(b_of(tally), torch.full((64, 8), 0.035))


@pytest.mark.parametrize(
    ("delta", "needle"),
    [(1e30, "round.max_update_ratio = 100"), (100 * 0.02, "round.outlier_factor = 20")],
    ids=["finite-1e30", "100x-median"],
)
def test_a_huge_or_outlying_update_is_rejected_and_the_round_goes_on(tmp_path, delta, needle):
    fed, assignments = setup()
    replies = [reply(a, 0.02) for a in assignments]
    replies[2] = reply(assignments[2], delta)
    judged, tally, events = run_round(fed, assignments, replies, tmp_path)
    bad = events[assignments[2].client]
    assert bad["status"] == "rejected" and needle in bad["reason"]
    assert len(tally.accepted) == 5 and tally.rejected == 1
    torch.testing.assert_close(b_of(tally), torch.full((64, 8), 0.02))


def test_the_bounds_can_be_turned_off_and_clipping_on(tmp_path):
    fed, assignments = setup("round.outlier_factor=0", "round.clip_updates=2")
    replies = [reply(a, 0.02) for a in assignments]
    replies[2] = reply(assignments[2], 100 * 0.02)
    judged, tally, events = run_round(fed, assignments, replies, tmp_path)
    clipped = events[assignments[2].client]
    assert clipped["status"] == "ok" and clipped["clipped_from_norm"] == pytest.approx(
        2.0 * math.sqrt(512)
    )
    # The outlier now counts with twice the median's norm: (5 x 0.02 + 0.04) / 6.
    torch.testing.assert_close(b_of(tally), torch.full((64, 8), 0.14 / 6))


class Overflowing(FedAvg):
    """FedAvg with a server step that overflows (as a server optimizer can)."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        state = {k: v * 1e30 for k, v in from_record(arrays).items()}
        return to_record(state), metrics


def test_a_non_finite_aggregate_abandons_the_round_with_the_reason():
    fed, assignments = setup()
    fed.strategy = Overflowing()
    tally = steps.Tally(accepted=[(a.client, reply(a, 1e10)) for a in assignments[:3]])
    adapter, score, why, _ = _aggregate(fed, 1, tally, lambda adapter: 1.0)
    assert adapter is None and math.isnan(score) and "non-finite" in why
    fed.strategy = FedAvg()
    tally = steps.Tally(accepted=[(a.client, reply(a, 0.1)) for a in assignments[:3]])
    adapter, score, why, _ = _aggregate(fed, 1, tally, lambda adapter: float("inf"))
    assert adapter is None and "perplexity is inf" in why


def test_a_declined_task_is_dropped_not_rejected():
    from flwr.app import Error

    from fedtune.protocol import DECLINED_REPLY_CODE

    fed, assignments = setup()
    declined = Message(Error(DECLINED_REPLY_CODE, "battery low"), reply_to=assignments[0].message)
    judged = steps.judge(fed, 1, assignments[0], declined, ADAPTER, 1.0)
    assert judged.event["status"] == "dropped" and "battery low" in judged.event["reason"]


def test_an_unknown_config_key_of_a_plugin_travels_to_the_client():
    fed, _ = setup()
    sampled = steps.sample(fed, 1, ADAPTER, client_spec(fed.scenario))
    for message in sampled:
        message.content["config"] = ConfigRecord({**message.content["config"], "my-key": 3})
    (first, *_) = steps.assign(fed, 1, sampled, ADAPTER)
    config = first.message.content.config_records["config"]
    assert config["my-key"] == 3 and config["client-engine"] == "backprop"
