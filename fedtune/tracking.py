"""Experiment trackers: every event of ``metrics.jsonl`` also goes to TensorBoard and MLflow.

A tracker (an :class:`~fedtune.metrics.EventSink`) takes the events
:class:`fedtune.metrics.EventLog` writes, as it writes them (the loop does not know
trackers exist), and turns each ``round`` event
into scalars at step = round (:func:`round_scalars`): the event's numbers (perplexity,
train loss, bytes, participants, wall and simulated seconds, epsilon), its per-tier
counts (``participants_by_tier/jetson``), the strategy's own metrics
(``strategy/<name>``) and a summary of that round's ``client_update`` events
(``clients/ok``, ``clients/loss_mean``, ...). Both trackers are off by default;
``[tracking]`` turns them on, and ``pip install 'fedtune[tracking]'`` brings the
libraries (``tensorboard``, ``mlflow-skinny``).

- **TensorBoard**: ``torch.utils.tensorboard`` writes ``RUN_DIR/tensorboard``; a resumed
  run purges the steps after its checkpoint, so a round rerun is not drawn twice.
- **MLflow**: one MLflow run per fedtune run, its id kept in ``RUN_DIR/tracking.json`` so
  a resume logs to the same run. The scenario's keys are its params. The default store is
  MLflow's file store in ``RUN_DIR/mlruns`` (in maintenance mode since MLflow 3.7, so
  fedtune opts in with ``MLFLOW_ALLOW_FILE_STORE``; a database store costs seconds of
  migrations per folder): ``tracking.mlflow_uri`` names any other.

A tracker that fails mid-run is logged once and dropped: the run and ``metrics.jsonl``
go on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.config import SECRET_KEYS, SECTIONS, Scenario, TrackingConfig, section_values
from fedtune.errors import ConfigError
from fedtune.metrics import EventSink, atomic_write_json

if TYPE_CHECKING:
    from fedtune.checkpoint import Checkpoint

logger = logging.getLogger("fedtune")

TRACKING_FILE = "tracking.json"
"""In the run folder: the MLflow run id (and store) a resume logs to again."""
_NOT_SCALARS = {"round", "event", "status", "reason", "client", "node"}


def check_trackers(config: TrackingConfig) -> None:
    """Refuse a ``[tracking]`` whose library is not installed (before a run starts)."""
    wanted = {"tensorboard": config.tensorboard, "mlflow": config.mlflow}
    for key, on in wanted.items():
        if not on:
            continue
        try:
            __import__(key)
        except ImportError:
            raise ConfigError(
                f"tracking.{key} = true needs the {key} package: "
                "pip install 'fedtune[tracking]' (or set it to false)"
            ) from None


def open_trackers(
    scenario: Scenario, run_dir: Path, resume: Checkpoint | None = None
) -> list[EventSink]:
    """The trackers ``scenario.tracking`` asks for, writing for the run in ``run_dir``."""
    config = scenario.tracking
    check_trackers(config)
    trackers: list[EventSink] = []
    if config.tensorboard:
        trackers.append(TensorBoardTracker(run_dir, resume.round + 1 if resume else None))
    if config.mlflow:
        trackers.append(MlflowTracker(scenario, run_dir))
    return trackers


def round_scalars(event: dict[str, Any], clients: list[dict[str, Any]]) -> dict[str, float]:
    """A ``round`` event and its round's ``client_update`` events as flat, finite scalars.

    Numbers keep their names, nested mappings are flattened with ``/``
    (``strategy_metrics`` becomes ``strategy/``), an abandoned round has
    ``abandoned = 1``; the clients give ``clients/<status>`` counts and the mean, least
    and largest loss and means of the resources of those accepted.
    """
    scalars: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                put(f"{key}/{k}", v)
        elif isinstance(value, int | float) and math.isfinite(value):
            scalars[key] = float(value)

    for key, value in event.items():
        if key not in _NOT_SCALARS:
            put("strategy" if key == "strategy_metrics" else key, value)
    if event.get("round", 0) > 0:
        scalars["abandoned"] = float(event.get("status") == "abandoned")
    if clients:
        for status in ("ok", "rejected", "dropped"):
            scalars[f"clients/{status}"] = float(sum(c.get("status") == status for c in clients))
        ok = [c for c in clients if c.get("status") == "ok"]
        for field, kinds in (
            ("loss", ("mean", "min", "max")),
            ("compute_seconds", ("mean", "max")),
            ("simulated_seconds", ("mean", "max")),
            ("peak_rss_mb", ("max",)),
        ):
            values = [float(c[field]) for c in ok if _finite(c.get(field))]
            if values:
                summary = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
                for kind in kinds:
                    scalars[f"clients/{field}_{kind}"] = summary[kind]
    return scalars


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


class _RoundBuffer:
    """Holds a round's ``client_update`` events until its ``round`` event arrives."""

    def __init__(self) -> None:
        self.clients: list[dict[str, Any]] = []

    def take(self, event: dict[str, Any]) -> tuple[int, dict[str, float], list[float]] | None:
        """For a ``round`` event: (round, scalars, accepted clients' losses); else None."""
        if event.get("event") == "client_update":
            self.clients.append(event)
            return None
        if event.get("event") != "round":
            return None
        clients, self.clients = self.clients, []
        losses = [c["loss"] for c in clients if c.get("status") == "ok" and _finite(c.get("loss"))]
        return int(event["round"]), round_scalars(event, clients), losses


class TensorBoardTracker:
    """Scalars per round and a histogram of the accepted clients' losses, in
    ``RUN_DIR/tensorboard``."""

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        self.buffer = _RoundBuffer()

    def record(self, event: dict[str, Any]) -> None:
        taken = self.buffer.take(event)
        if taken is None:
            return
        step, scalars, losses = taken
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        if losses:
            self.writer.add_histogram("clients/loss", np.asarray(losses), global_step=step)
        self.writer.flush()  # a round is minutes apart: show it now, not in 2 minutes

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per fedtune run: the scenario as params, rounds as metrics."""

    def __init__(self, scenario: Scenario, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        config = scenario.tracking
        uri = config.mlflow_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param, RunStatus
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.buffer = _RoundBuffer()
        saved = _read_tracking(run_dir)
        if saved.get("mlflow_run_id") and saved.get("mlflow_uri") == uri:
            self.run_id = str(saved["mlflow_run_id"])
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return
        name = config.experiment or scenario.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        run = self.client.create_run(
            experiment_id,
            run_name=run_dir.name,
            tags={
                "fedtune.run_dir": str(run_dir.resolve()),
                "fedtune.scenario": scenario.name,
                "fedtune.strategy": scenario.strategy.name,
            },
        )
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in scenario_params(scenario).items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        atomic_write_json(
            run_dir / TRACKING_FILE, {**saved, "mlflow_run_id": self.run_id, "mlflow_uri": uri}
        )

    def record(self, event: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        taken = self.buffer.take(event)
        if taken is None:
            return
        step, scalars, _ = taken
        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in scalars.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


def scenario_params(scenario: Scenario) -> dict[str, str]:
    """The scenario's dotted keys and values as MLflow params (secrets left out)."""
    params = {"name": scenario.name}
    for section in SECTIONS:
        for key, value in section_values(scenario, section).items():
            if (section, key) not in SECRET_KEYS:
                params[f"{section}.{key}"] = (
                    json.dumps(value) if not isinstance(value, str) else value
                )
    return params


def _mlflow_key(key: str) -> str:
    """MLflow allows letters, digits, ``_ - . / `` and spaces in a key."""
    return re.sub(r"[^\w\-./ ]", "_", key)


def _read_tracking(run_dir: Path) -> dict[str, Any]:
    path = run_dir / TRACKING_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}
