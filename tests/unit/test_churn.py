"""Node churn in real rounds of the tiny model on an in-process grid (the real ClientApp,
real discovery queries): dead nodes stop being sampled, late joiners train, a restarted
node reclaims its partition."""

from __future__ import annotations

from typing import Any

import pytest

from fedtune.config import load_scenario
from fedtune.metrics import read_events
from fedtune.server.loop import Silent, run_federation

from .node_grid import InProcessGrid, task_identity


class Script(Silent):
    """Changes the grid at a chosen point of the run, as a fleet would."""

    def __init__(self, at: int, change: Any, mid_round: bool = False) -> None:
        self.at, self.change, self.mid_round, self.done = at, change, mid_round, False

    def run_started(self, scenario: Any, initial_perplexity: float) -> None:
        if self.at == 0:  # after discovery, before round 1
            self.change()

    def client_done(self, rnd: int, event: dict[str, Any]) -> None:
        if self.mid_round and rnd == self.at and not self.done:
            self.done = True
            self.change()

    def round_ended(self, event: dict[str, Any]) -> None:
        if not self.mid_round and event["round"] == self.at:
            self.change()


def run(tmp_path, grid: InProcessGrid, script: Script | None, *overrides: str):  # noqa: ANN201
    scenario = load_scenario(
        "tiny",
        [
            "data.num_clients=6",
            "client.local_steps=1",
            "client.batch_size=1",
            "client.seq_len=32",
            "data.eval_chunks=2",
            "round.clients_per_round=3",
            "round.min_reports=1",
            "round.deadline_s=1",
            "round.join_wait_s=5",
            *overrides,
        ],
    )
    with task_identity():
        run_federation(grid, scenario, tmp_path, script, expected_nodes=len(grid.node_ids))
    updates = list(read_events(tmp_path / "metrics.jsonl", "client_update"))
    nodes = {e["round"]: e for e in read_events(tmp_path / "metrics.jsonl", "nodes")}
    rounds = {e["round"]: e for e in read_events(tmp_path / "metrics.jsonl", "round")}
    return updates, nodes, rounds


def test_a_node_killed_for_good_stops_being_sampled_after_the_configured_misses(tmp_path):
    grid = InProcessGrid({100 + i: i for i in range(4)})
    # Powered off for good once discovered, still listed (as until Flower's heartbeat ends).
    script = Script(0, lambda: grid.silent.add(103))
    updates, nodes, rounds = run(tmp_path, grid, script, "round.max_missed=2", "run.rounds=5")

    dead = [u for u in updates if u["node"] == 103]
    assert [u["status"] for u in dead] == ["dropped", "dropped"]  # sampled twice, then never
    assert all("no reply" in u["reason"] for u in dead)
    benched_in = dead[-1]["round"] + 1
    assert nodes[benched_in]["benched"] == [103] and nodes[benched_in]["live"] == 3
    for rnd in range(benched_in, 6):  # the three live nodes, every one of them trains
        assert sorted(u["node"] for u in updates if u["round"] == rnd) == [100, 101, 102]
        assert rounds[rnd]["participants"] == 3 and rounds[rnd]["dropped"] == 0
    assert benched_in <= 5  # the seed samples node 103 in two of the first four rounds


def test_a_node_joining_in_round_3_trains_in_round_4(tmp_path):
    grid = InProcessGrid({100 + i: i for i in range(3)})

    def churn() -> None:  # mid-round 3: client 4's node comes up, node 100 goes away
        grid.add_node(200, 4)
        grid.remove_node(100)

    updates, nodes, rounds = run(tmp_path, grid, Script(3, churn, mid_round=True), "run.rounds=4")

    assert all(u["node"] != 200 for u in updates if u["round"] <= 3)
    (joiner,) = [u for u in updates if u["node"] == 200]
    assert (joiner["round"], joiner["client"], joiner["status"]) == (4, 4, "ok")
    assert nodes[4]["joined"] == [{"node": 200, "client": 4}] and nodes[4]["gone"] == [100]
    assert all(u["node"] != 100 for u in updates if u["round"] == 4)
    assert rounds[4]["participants"] == 3


def test_a_restarted_node_reclaims_its_partition(tmp_path):
    grid = InProcessGrid({100 + i: i for i in range(3)})

    def restart() -> None:  # client 1's device restarts: a new node id, the old one still listed
        grid.silent.add(101)
        grid.add_node(201, 1)

    updates, nodes, rounds = run(tmp_path, grid, Script(2, restart), "run.rounds=3")

    assert nodes[3]["reclaimed"] == [{"client": 1, "from": 101, "to": 201}]
    round3 = {u["client"]: u for u in updates if u["round"] == 3}
    assert sorted(round3) == [0, 1, 2]
    assert round3[1]["node"] == 201 and round3[1]["status"] == "ok"
    assert all(u["node"] != 101 for u in updates if u["round"] == 3)
    assert grid.contexts[201].node_config["partition-id"] == 1  # its own, fresh Context
    assert rounds[3]["participants"] == 3


def test_node_keys_are_checked():
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="round.max_missed"):
        load_scenario("tiny", ["round.max_missed=-1"])
    with pytest.raises(ConfigError, match="round.join_wait_s"):
        load_scenario("tiny", ["round.join_wait_s=-2"])


@pytest.fixture
def identity():
    with task_identity():
        yield


def test_a_phone_not_heard_from_answers_discovery_only_when_it_checks_in(identity):
    """The gateway answers discovery for its phones; for a silent phone (one the loop
    benched) the answer waits for its next check-in, so a dead phone stays benched."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedtune.protocol import CLIENT_INDEX_KEY, INFO_KEY
    from fedtune.server.gateway.auth import Device, TokenBucket
    from fedtune.server.gateway.tasks import Tasks

    tasks = Tasks(None, fresh_s=10.0)
    phone = Device("d1", b"", node_id=7, client_index=3, name="p", bucket=TokenBucket(1, 1))

    def query() -> str:
        message = Message(
            RecordDict({INFO_KEY: ConfigRecord({})}), dst_node_id=7, message_type=MessageType.QUERY
        )
        return tasks.push(message, phone)

    fresh = query()  # it has just enrolled: answered at once
    assert tasks.pull([fresh])[0][1].content[INFO_KEY][CLIENT_INDEX_KEY] == 3
    phone.last_seen -= 60.0  # silent for a minute
    silent = query()
    assert tasks.pull([silent]) == []
    assert tasks.check_in(phone) is None  # it checks in: alive, no task
    ((key, reply),) = tasks.pull([silent])
    assert key == silent and reply.content[INFO_KEY][CLIENT_INDEX_KEY] == 3
