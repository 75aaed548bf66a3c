"""The warm-up before round 1 (``run_federation(..., warm_workers=N)``, what ``fedtune
simulate`` asks of its Ray workers), on an in-process grid with the real ClientApp."""

from __future__ import annotations

import json
from typing import Any

from flwr.app import Error, Message

from fedtune.clients.app import _model
from fedtune.config import load_scenario
from fedtune.server.loop import run_federation, warm_up

from .node_grid import InProcessGrid, task_identity

WARM = "query.warm"


def scenario() -> Any:
    return load_scenario(
        "tiny",
        [
            "data.num_clients=4",
            "client.local_steps=1",
            "client.batch_size=1",
            "client.seq_len=32",
            "data.eval_chunks=2",
            "round.clients_per_round=2",
            "round.min_reports=1",
            "run.rounds=1",
        ],
    )


def events(path) -> list[dict[str, Any]]:  # noqa: ANN001
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_workers_load_the_model_before_round_1_and_say_so(tmp_path):
    grid = InProcessGrid({100 + i: i for i in range(4)})
    _model.cache_clear()
    with task_identity():
        warming = warm_up(grid, scenario(), 2)
        run_federation(grid, scenario(), tmp_path, expected_nodes=4, warming=warming)

    kinds = [(m.metadata.message_type, m.metadata.dst_node_id) for m in grid.delivered]
    warmed = [i for i, (kind, _) in enumerate(kinds) if kind == WARM]
    assert warmed == [0, 1] and [kinds[i][1] for i in warmed] == [100, 101]  # sent first
    assert all(kind != WARM for kind, _ in kinds[2:])
    # The warm-up loaded the model; round 1's training found it in the cache.
    assert _model.cache_info().misses == 1
    log = events(tmp_path)
    names = [e["event"] for e in log]
    assert names.index("warm_up") < names.index("client_update")
    (warm,) = [e for e in log if e["event"] == "warm_up"]
    assert (warm["workers"], warm["ready"], warm["failed"]) == (2, 2, 0)
    assert warm["reported_load_seconds"] >= 0


def test_a_failed_warm_up_is_recorded_and_round_1_trains_anyway(tmp_path):
    from fedtune.clients.app import app as fedtune_app

    def app(message: Message, context: Any) -> Message:
        if message.metadata.message_type == WARM:
            return Message(Error(code=0, reason="no disk for the model"), reply_to=message)
        return fedtune_app(message, context)

    grid = InProcessGrid({100 + i: i for i in range(4)}, app=app)
    with task_identity():
        warming = warm_up(grid, scenario(), 1)
        summary = run_federation(grid, scenario(), tmp_path, expected_nodes=4, warming=warming)

    (warm,) = [e for e in events(tmp_path) if e["event"] == "warm_up"]
    assert (warm["workers"], warm["ready"], warm["failed"]) == (1, 0, 1)
    assert summary["rounds_completed"] == 1


def test_no_warm_up_is_sent_unless_asked(tmp_path):
    grid = InProcessGrid({100 + i: i for i in range(4)})
    with task_identity():
        run_federation(grid, scenario(), tmp_path, expected_nodes=4)
    assert all(m.metadata.message_type != WARM for m in grid.delivered)
    assert all(e["event"] != "warm_up" for e in events(tmp_path))


def test_deployed_nodes_are_warmed_as_discovery_ends(tmp_path):
    """``fedtune serve``'s warm-up (``warm_nodes``): every discovered node is sent one as
    discovery ends, before any train message; replies already there are recorded."""
    grid = InProcessGrid({100 + i: i for i in range(4)})
    _model.cache_clear()
    with task_identity():
        run_federation(grid, scenario(), tmp_path, expected_nodes=4, warm_nodes=True)

    kinds = [(m.metadata.message_type, m.metadata.dst_node_id) for m in grid.delivered]
    first_train = next(i for i, (kind, _) in enumerate(kinds) if kind == "train")
    assert sorted(node for kind, node in kinds[:first_train] if kind == WARM) == [
        100,
        101,
        102,
        103,
    ]
    assert all(kind != WARM for kind, _ in kinds[first_train:])
    assert _model.cache_info().misses == 1  # loaded by the warm-up, used by round 1
    (warm,) = [e for e in events(tmp_path) if e["event"] == "warm_up"]
    # The in-process grid answers as it is pushed: all four were there by round 1.
    assert (warm["workers"], warm["ready"], warm["failed"]) == (4, 4, 0)
