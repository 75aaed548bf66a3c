"""Ctrl-C stops ``fedtune simulate`` cleanly: within 10 s, with a checkpoint that a
resume continues; piped to a log, progress is one line per client reply and round."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.checkpoint import load_latest_checkpoint
from fedtune.metrics import read_events
from tests.conftest import ROOT, run_cli


@pytest.mark.slow  # two Ray simulations, ~90 s on 2 cores
def test_sigint_stops_within_10s_and_the_run_resumes(tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtune.cli", "simulate", "tiny", "--out", str(out)]
            + ["--set", "run.rounds=50"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=ROOT,
            env={**os.environ},
        )
        try:
            deadline = time.monotonic() + 300
            while "round 2 client" not in log.read_text():  # mid-round 2, round 1 saved
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
            took = time.monotonic() - sent
        finally:
            proc.kill()
    text = log.read_text()
    assert took < 10, f"{took:.1f} s after SIGINT\n{text}"
    assert proc.returncode == 130, text
    assert f"fedtune simulate --resume {out}" in text
    assert not (out / "summary.json").exists()
    checkpoint = load_latest_checkpoint(out / "checkpoints")
    assert checkpoint is not None and checkpoint.round >= 1
    # Not on a terminal: one line per client reply, as it happens.
    assert "round 1 client" in text and "round 1: perplexity" in text

    done = run_cli(
        "simulate",
        "--resume",
        str(out),
        "--set",
        f"run.rounds={checkpoint.round + 1}",
        "--allow-config-change",
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    rounds = [e["round"] for e in read_events(out / "metrics.jsonl", "round")]
    assert rounds == list(range(checkpoint.round + 2))
