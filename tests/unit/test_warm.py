"""The warm worker of a SuperNode (``fedtune.clients.warm``): real processes, the tiny
model. The ClientApp hands messages to one long-lived worker that loads the model once;
a dead worker is replaced with the reason logged; a node can turn it off."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune.config import client_spec, load_scenario
from fedtune.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    INFO_KEY,
    METRICS_KEY,
    WARM_ACTION,
    WARM_SECONDS_KEY,
)
from fedtune.wire import to_record

from .node_grid import task_identity

pytestmark = pytest.mark.slow  # starts worker processes that import torch (~20-40 s)


@pytest.fixture
def workers(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_WORKER_DIR", str(tmp_path))
    monkeypatch.setenv("FEDTUNE_WORKER_PARENT", str(os.getpid()))  # exits with the tests
    with task_identity():
        yield tmp_path
    for lock in tmp_path.glob("*.lock"):
        pid = lock.read_text().strip()
        if pid:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def train(rnd: int, node_config: dict | None = None) -> tuple[Message, Context]:
    from fedtune.models import adapter_state, attach_lora, load_base_model

    scenario = load_scenario("tiny", ["client.local_steps=1", "client.batch_size=1"])
    adapter = adapter_state(attach_lora(load_base_model("tiny-llama"), scenario.lora, seed=0))
    config = ConfigRecord({**client_spec(scenario), "round": rnd})
    message = Message(
        RecordDict({ARRAYS_KEY: to_record(adapter), CONFIG_KEY: config}),
        dst_node_id=5,
        message_type=MessageType.TRAIN,
    )
    return message, Context(1, 5, {"partition-id": 0, **(node_config or {})}, RecordDict(), {})


def metrics(reply: Message) -> dict:
    assert not reply.has_error(), reply.error
    return dict(reply.content.metric_records[METRICS_KEY])


def test_the_worker_loads_the_model_once_and_a_dead_one_is_replaced(workers, caplog):
    from fedtune.clients.warm import app

    caplog.set_level(logging.INFO, logger="flwr")
    first = metrics(app(*train(1)))
    second = metrics(app(*train(2)))
    assert (first["warm-worker"], first["process-model-loads"]) == (1, 1)
    assert (second["warm-worker"], second["process-model-loads"]) == (1, 1)  # still loaded
    assert "no worker at" in caplog.text and "starting one" in caplog.text

    (lock,) = workers.glob("*.lock")
    os.kill(int(lock.read_text()), signal.SIGKILL)  # the worker dies
    time.sleep(0.5)
    caplog.clear()
    third = metrics(app(*train(3)))
    assert "no worker at" in caplog.text  # the reason, then a new worker
    assert (third["warm-worker"], third["process-model-loads"]) == (1, 1)


def test_a_node_can_turn_the_worker_off(workers):
    from fedtune.clients.warm import app

    reply = metrics(app(*train(1, {"warm-worker": "false"})))
    assert reply["warm-worker"] == 0 and reply["process-model-loads"] >= 1
    assert not list(workers.glob("*.sock"))  # no worker was started


def warm_query(node_config: dict | None = None) -> tuple[Message, Context]:
    scenario = load_scenario("tiny", ["client.local_steps=1", "client.batch_size=1"])
    message = Message(
        RecordDict({CONFIG_KEY: ConfigRecord({**client_spec(scenario), "round": 0})}),
        dst_node_id=5,
        message_type=f"{MessageType.QUERY}.{WARM_ACTION}",
    )
    return message, Context(1, 5, {"partition-id": 0, **(node_config or {})}, RecordDict(), {})


def test_the_warm_up_starts_the_worker_and_loads_the_model_before_round_1(workers):
    from fedtune.clients.warm import app

    reply = app(*warm_query())
    assert not reply.has_error(), reply.error
    assert reply.content.config_records[INFO_KEY][WARM_SECONDS_KEY] > 0
    assert len(list(workers.glob("*.sock"))) == 1  # the worker listens
    first = metrics(app(*train(1)))
    assert (first["warm-worker"], first["process-model-loads"]) == (1, 1)  # no second load


def test_a_node_without_a_worker_answers_the_warm_up_at_once(workers):
    from fedtune.clients.warm import app

    reply = app(*warm_query({"warm-worker": "false"}))
    assert reply.content.config_records[INFO_KEY][WARM_SECONDS_KEY] == 0.0
    assert not list(workers.glob("*.sock"))  # nothing started, nothing loaded
