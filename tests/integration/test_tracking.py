"""[tracking]: a tiny run's per-round perplexity in TensorBoard and MLflow, read back
with their own readers (TensorBoard's EventAccumulator, MLflow's client)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.metrics import read_events
from tests.conftest import simulate_here

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


@pytest.mark.slow  # ~35 s on 2 cores
def test_tensorboard_and_mlflow_hold_each_rounds_perplexity(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    simulate_here(
        "tiny",
        out,
        *("--set", "run.rounds=1"),
        *("--set", "tracking.tensorboard=true"),
        *("--set", "tracking.mlflow=true"),
    )
    expected = {e["round"]: e["perplexity"] for e in read_events(out / "metrics.jsonl", "round")}
    assert sorted(expected) == [0, 1]

    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    drawn = {s.step: s.value for s in board.Scalars("perplexity")}
    assert drawn == pytest.approx(expected, rel=1e-6)  # TensorBoard stores float32
    assert [s.value for s in board.Scalars("clients/ok")] == [3.0]
    assert "clients/loss" in board.Tags()["histograms"]

    saved = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=saved["mlflow_uri"])
    history = client.get_metric_history(saved["mlflow_run_id"], "perplexity")
    assert {m.step: m.value for m in history} == expected
    run = client.get_run(saved["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "fedavg"
    assert run.data.tags["fedtune.scenario"] == "tiny"
