"""A third-party strategy, installed as a package, runs by name in a real simulation."""

from __future__ import annotations

import json
import subprocess
import sys

from fedtune.metrics import read_events

from ..conftest import run_cli

DIST = "fedtune-test-my-avg"

PYPROJECT = f"""\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{DIST}"
version = "0.0.1"

[tool.setuptools]
py-modules = ["my_avg"]

[project.entry-points."fedtune.strategies"]
my-avg = "my_avg:MyAvg"
"""

# Written as a researcher who knows Flower and not fedtune would write it.
MY_AVG = '''\
"""My averaging rule."""

import os

from flwr.serverapp.strategy import FedAvg


class MyAvg(FedAvg):
    """FedAvg that counts its aggregations."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def aggregate_train(self, server_round, replies):
        self.calls += 1
        if os.environ.get("MY_AVG_LOG"):
            with open(os.environ["MY_AVG_LOG"], "a") as log:
                log.write(f"call {self.calls} round {server_round}\\n")
        arrays, metrics = super().aggregate_train(server_round, replies)
        metrics["my-calls"] = self.calls  # its own number, for the round's event
        return arrays, metrics
'''


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300
    )


def test_installed_plugin_runs_by_name(tmp_path):
    pkg = tmp_path / "my-avg"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "my_avg.py").write_text(MY_AVG)
    installed = pip("install", "--no-deps", "--no-build-isolation", str(pkg))
    assert installed.returncode == 0, installed.stderr[-3000:]
    try:
        listed = run_cli("strategies")
        assert listed.returncode == 0, listed.stderr[-3000:]
        line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("my-avg "))
        assert "FedAvg that counts its aggregations." in line
        assert f"[{DIST}: my_avg:MyAvg]" in line

        out = tmp_path / "run"
        calls = tmp_path / "calls.txt"
        result = run_cli(
            "simulate",
            "tiny",
            "--set",
            "strategy.name=my-avg",
            "--out",
            str(out),
            "--no-progress",
            env={"MY_AVG_LOG": str(calls)},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds_completed"] == 2
        assert 'name = "my-avg"' in (out / "scenario.toml").read_text()
        assert calls.read_text().splitlines() == ["call 1 round 1", "call 2 round 2"]
        # What the strategy's MetricRecord holds is in each round's event.
        rounds = [r for r in read_events(out / "metrics.jsonl", "round") if r["round"] > 0]
        assert [r["strategy_metrics"]["my-calls"] for r in rounds] == [1, 2]
        assert all("loss" in r["strategy_metrics"] for r in rounds)  # FedAvg's own
    finally:
        removed = pip("uninstall", "-y", DIST)
        assert removed.returncode == 0, removed.stderr[-3000:]
