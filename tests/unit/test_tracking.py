"""fedtune.tracking: a round and its clients as scalars (exact), EventLog's sinks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedtune.config import load_scenario
from fedtune.errors import ConfigError
from fedtune.metrics import EventLog
from fedtune.tracking import round_scalars, scenario_params


def test_round_scalars_flatten_the_event_and_summarize_its_clients() -> None:
    event = {
        "event": "round",
        "round": 2,
        "status": "abandoned",
        "reason": "1 valid updates < round.min_reports = 2",
        "perplexity": 40.0,
        "train_loss": math.nan,
        "participants": 1,
        "participants_by_tier": {"jetson": 1, "watch": 0},
        "strategy_metrics": {"pooled_variance": 0.25},
        "epsilon": None,
    }
    clients = [
        {"status": "ok", "loss": 2.0, "compute_seconds": 1.0, "peak_rss_mb": 600.0},
        {"status": "ok", "loss": 4.0, "compute_seconds": 3.0, "peak_rss_mb": 700.0},
        {"status": "rejected", "loss": 99.0, "reason": "non-finite"},
        {"status": "dropped"},
    ]
    assert round_scalars(event, clients) == {
        "perplexity": 40.0,
        "participants": 1.0,
        "participants_by_tier/jetson": 1.0,
        "participants_by_tier/watch": 0.0,
        "strategy/pooled_variance": 0.25,
        "abandoned": 1.0,
        "clients/ok": 2.0,
        "clients/rejected": 1.0,
        "clients/dropped": 1.0,
        "clients/loss_mean": 3.0,
        "clients/loss_min": 2.0,
        "clients/loss_max": 4.0,
        "clients/compute_seconds_mean": 2.0,
        "clients/compute_seconds_max": 3.0,
        "clients/peak_rss_mb_max": 700.0,
    }


def test_round_zero_has_no_abandoned_flag() -> None:
    assert round_scalars({"event": "round", "round": 0, "perplexity": 9.0}, []) == {
        "perplexity": 9.0
    }


def test_scenario_params_leave_secrets_out() -> None:
    scenario = load_scenario(
        "tiny", ["gateway.enabled=true", "gateway.token=abcdefgh12", "tracking.mlflow=true"]
    )
    params = scenario_params(scenario)
    assert params["lora.targets"] == '["q_proj", "v_proj"]'
    assert params["tracking.mlflow"] == "true"
    assert "gateway.token" not in params


def test_mlflow_uri_without_mlflow_is_refused() -> None:
    with pytest.raises(ConfigError, match="tracking.mlflow_uri"):
        load_scenario("tiny", ["tracking.mlflow_uri=sqlite:///x.db"])


class _Broken:
    def __init__(self) -> None:
        self.seen: list[dict] = []

    def record(self, event: dict) -> None:
        self.seen.append(event)
        raise OSError("store went away")

    def close(self) -> None:
        raise AssertionError("a dropped sink is not closed")


class _Keeper:
    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.closed = False

    def record(self, event: dict) -> None:
        self.seen.append(event)

    def close(self) -> None:
        self.closed = True


def test_a_failing_sink_is_dropped_and_the_log_goes_on(tmp_path: Path) -> None:
    broken, keeper = _Broken(), _Keeper()
    log = EventLog(tmp_path / "metrics.jsonl", [broken, keeper])
    log.write("round", round=0, perplexity=5.0)
    log.write("round", round=1, perplexity=4.0)
    log.close()
    assert len(broken.seen) == 1
    assert [e["round"] for e in keeper.seen] == [0, 1] and keeper.closed
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
