"""The plug-in example of docs/strategies.md is real code that does what the doc says.

The example package is written out from the doc, its entry point loaded the way the
registry loads one, and the strategy driven through one round. (Installing it and
running it by name in a simulation is what tests/integration/test_plugin_strategy.py
does for a plug-in of the same shape.)
"""

from __future__ import annotations

import re
import sys
import tomllib

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.protocol import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY
from fedtune.strategies.registry import GROUP, Registered, _parameters
from fedtune.wire import from_record, to_record

from ..conftest import ROOT
from .node_grid import NodeListGrid, task_identity

DOC = ROOT / "docs" / "strategies.md"
KEY = "layers.0.q_proj.lora_B.weight"


@pytest.fixture()
def example(tmp_path, monkeypatch):
    """The doc's example package on disk and importable; its entry point."""
    files = dict(re.findall(r"`my_strategy/([\w.]+)`:\n\n```\w+\n(.*?)```", DOC.read_text(), re.S))
    assert sorted(files) == ["pyproject.toml", "server_lr.py"]
    assert sum(len(body.splitlines()) for body in files.values()) <= 45  # "about 40 lines"
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tomllib.loads(files["pyproject.toml"])["project"]["entry-points"][GROUP]
    sys.modules.pop("server_lr", None)


def one_round(strategy) -> torch.Tensor:
    sent = {KEY: torch.tensor([1.0, 2.0])}
    replies = [({KEY: torch.tensor([3.0, 2.0])}, 1), ({KEY: torch.tensor([3.0, 6.0])}, 1)]
    with task_identity():
        strategy.configure_train(1, to_record(sent), ConfigRecord({}), NodeListGrid([1, 2]))
        messages = [
            Message(
                RecordDict({ARRAYS_KEY: to_record(s), METRICS_KEY: MetricRecord({WEIGHT_KEY: w})}),
                dst_node_id=1,
                message_type=MessageType.TRAIN,
            )
            for s, w in replies
        ]
        arrays, _ = strategy.aggregate_train(1, messages)
    return from_record(arrays)[KEY]


def test_doc_example_steps_server_lr_of_the_way_to_the_mean(example):
    (name, target), *_ = example.items()
    assert name == "server-lr"
    cls = Registered(name, target, "my-strategy").load()
    accepted, takes_any = _parameters(cls)
    assert "server_lr" in accepted and takes_any  # sampling kwargs reach FedAvg
    sampling = {"fraction_train": 1.0, "min_train_nodes": 2, "min_available_nodes": 2}
    half = one_round(cls(server_lr=0.5, **sampling))
    assert torch.equal(half, torch.tensor([2.0, 3.0]))  # halfway from [1, 2] to [3, 4]
    assert torch.equal(one_round(cls(**sampling)), torch.tensor([3.0, 4.0]))  # FedAvg
    assert half.dtype == torch.float32
