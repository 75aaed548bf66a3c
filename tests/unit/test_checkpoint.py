from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM

from fedtune.checkpoint import (
    Checkpoint,
    CorruptCheckpoint,
    load_latest_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)


def make(rnd: int) -> Checkpoint:
    return Checkpoint(
        round=rnd,
        scenario_name="tiny",
        scenario_toml="[run]\nseed = 0\n",
        scenario_digest="d",
        adapter={"w": torch.arange(6.0).view(2, 3) + rnd},
        strategy={"m_t": ("dict", {"w": torch.ones(2, 3)})},
        history={"initial_perplexity": 10.0, "bytes_up": 5},
    )


def test_round_trip_is_exact():
    back = Checkpoint.from_bytes(make(3).to_bytes())
    assert back.round == 3 and back.history == {"initial_perplexity": 10.0, "bytes_up": 5}
    assert torch.equal(back.adapter["w"], make(3).adapter["w"])


def test_keeps_the_newest(tmp_path):
    for rnd in range(5):
        save_checkpoint(tmp_path, make(rnd), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00003.ckpt", "round-00004.ckpt"]
    assert load_latest_checkpoint(tmp_path).round == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_checkpoint_falls_back_to_previous(tmp_path, damage, caplog):
    save_checkpoint(tmp_path, make(1), keep=3)
    newest = save_checkpoint(tmp_path, make(2), keep=3)
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-10] ^= 0x01
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"hello world" * 20)
    newest.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint):
        Checkpoint.from_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="fedtune"):
        assert load_latest_checkpoint(tmp_path).round == 1
    assert "round-00002.ckpt is corrupt" in caplog.text


def test_no_valid_checkpoint(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None
    (tmp_path / "round-00001.ckpt").write_bytes(b"FTCKPT1\n")
    assert load_latest_checkpoint(tmp_path) is None


def test_server_optimizer_state_round_trips():
    strategy = FedAdam()
    strategy.current_arrays = {"w": np.arange(4.0)}
    strategy.m_t = {"w": np.full(4, 0.5)}
    strategy.v_t = {"w": np.full(4, 0.25)}
    state = strategy_state(strategy)
    back = Checkpoint.from_bytes(Checkpoint(1, "x", "", "", {}, state, {}).to_bytes()).strategy
    fresh = FedAdam()
    restore_strategy_state(fresh, back)
    for name in ("current_arrays", "m_t", "v_t"):
        got, want = getattr(fresh, name), getattr(strategy, name)
        assert all(np.array_equal(got[k], want[k]) for k in want), name

    momentum = FedAvgM(server_momentum=0.9)
    momentum.current_arrays = ArrayRecord({"w": Array(np.ones(3))})
    momentum.momentum_vector = [np.full(3, 2.0)]
    fresh_m = FedAvgM(server_momentum=0.9)
    restore_strategy_state(fresh_m, strategy_state(momentum))
    assert np.array_equal(fresh_m.current_arrays["w"].numpy(), np.ones(3))
    assert np.array_equal(fresh_m.momentum_vector[0], np.full(3, 2.0))


# A plug-in as a researcher writes it: Flower's FedAvg plus a counter, no fedtune API.
PLUGIN = '''
from flwr.serverapp.strategy import FedAvg


class CountingAvg(FedAvg):
    """FedAvg that counts its aggregations."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.history = []

    def aggregate_train(self, server_round, replies):
        self.calls += 1
        self.history.append(server_round)
        return super().aggregate_train(server_round, replies)
'''


def test_a_plugins_scalar_state_resumes_through_a_checkpoint_file(tmp_path, monkeypatch):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedtune.checkpoint import load_latest_checkpoint
    from fedtune.server.loop import RunState, aggregate_in_client_order

    from .node_grid import NodeListGrid, task_identity

    (tmp_path / "counting_avg.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    from counting_avg import CountingAvg  # an outside module, not fedtune's

    adapter = {"w": torch.ones(2, 3)}

    def one_round(strategy, rnd):
        with task_identity():
            (sent,) = strategy.configure_train(
                rnd,
                ArrayRecord({"w": Array(adapter["w"].numpy())}),
                ConfigRecord({}),
                NodeListGrid([1]),
            )
            content = RecordDict(
                {"arrays": sent.content["arrays"], "metrics": MetricRecord({"num-examples": 2})}
            )
            aggregate_in_client_order(strategy, rnd, [(0, Message(content, reply_to=sent))])

    strategy = CountingAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    for rnd in (1, 2):
        one_round(strategy, rnd)
    state = RunState(adapter, 10.0, 9.0, round=2, strategy=strategy_state(strategy))
    save_checkpoint(tmp_path / "checkpoints", state.to_checkpoint_of("tiny", "[run]\n", "d"), 3)

    resumed = CountingAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    restore_strategy_state(resumed, load_latest_checkpoint(tmp_path / "checkpoints").strategy)
    assert (resumed.calls, resumed.history) == (2, [1, 2])
    one_round(resumed, 3)
    assert (resumed.calls, resumed.history) == (3, [1, 2, 3])
    # Configuration is the scenario's, not the checkpoint's: it is not saved.
    assert "fraction_train" not in strategy_state(resumed)
