"""Crash and resume: a run SIGKILLed mid-run and resumed ends byte-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedtune.metrics import read_events

from ..conftest import ROOT, run_cli, simulate_here

# tiny's own 120 s deadline: a resumed run's Ray workers start in the warm-up before its
# first round, not inside that round's deadline (on a loaded machine that start once
# outlasted 120 s and the round was abandoned).
SETS = ["--set", "run.rounds=3", "--set", "client.local_steps=2"]
ARGS = [*SETS, "--no-progress"]


def rounds_done(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return -1
    return max((e["round"] for e in read_events(path, "round")), default=-1)


def test_sigkill_in_round_2_then_resume_is_byte_identical(tmp_path):
    """Killed during round 2 of 3, its event log torn mid-line as a kill during an append
    leaves it: the resume drops the torn line and ends byte-identical."""
    # The uninterrupted reference runs without Ray: the same seeds give the same bytes
    # (tests/integration/test_simulate.py), and the kill and the resume are on Ray.
    reference = tmp_path / "reference"
    simulate_here("tiny", reference, *SETS)

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune.cli", "simulate", "tiny", "--out", str(crashed), *ARGS],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while rounds_done(crashed) < 1:  # round 1 is written: round 2 is under way
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray processes
        proc.wait()
    assert not (crashed / "summary.json").exists()
    assert rounds_done(crashed) < 3
    torn = b'{"bytes_down": 1024, "client": 3, "event": "client_update", "rou'
    with open(crashed / "metrics.jsonl", "ab") as log:
        log.write(torn)

    result = run_cli("simulate", "--resume", str(crashed), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout
    ref_adapter = (reference / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (crashed / "adapter" / "adapter_model.safetensors").read_bytes() == ref_adapter

    ref_rounds = [
        (e["round"], e["perplexity"]) for e in read_events(reference / "metrics.jsonl", "round")
    ]
    got_rounds = [
        (e["round"], e["perplexity"]) for e in read_events(crashed / "metrics.jsonl", "round")
    ]
    assert got_rounds == ref_rounds  # one event per round, no duplicates, same values
    assert torn not in (crashed / "metrics.jsonl").read_bytes()
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert summary["bytes_up"] == json.loads((reference / "summary.json").read_text())["bytes_up"]


def test_resume_refuses_a_changed_config_naming_keys(tmp_path):
    run = tmp_path / "run"
    simulate_here("tiny", run, "--set", "run.rounds=1")
    (run / "summary.json").unlink()  # pretend it stopped before the end
    result = run_cli(
        "simulate",
        "--resume",
        str(run),
        "--set",
        "client.lr=0.5",
        "--set",
        "run.rounds=2",
        "--no-progress",
    )
    assert result.returncode == 2
    assert "run.rounds, client.lr" in result.stderr and "--allow-config-change" in result.stderr


def test_resume_of_a_finished_run_is_refused(tmp_path):
    run = tmp_path / "run"
    simulate_here("tiny", run, "--set", "run.rounds=1")
    result = run_cli("simulate", "--resume", str(run))
    assert result.returncode == 2 and "finished run" in result.stderr


# Every kind of damage is in tests/unit/test_checkpoint.py; here one, end to end.
@pytest.mark.parametrize("damage", ["flip"])
def test_resume_skips_a_damaged_checkpoint(tmp_path, damage):
    run = tmp_path / "run"
    # In this process; the resume below runs on Ray.
    simulate_here("tiny", run, "--set", "run.rounds=2")
    reference = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    (run / "summary.json").unlink()
    newest = sorted((run / "checkpoints").glob("*.ckpt"))[-1]
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[: len(data) - 100]
    newest.write_bytes(bytes(data))
    result = run_cli("simulate", "--resume", str(run), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "after round 1" in result.stdout  # the previous checkpoint
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == reference
