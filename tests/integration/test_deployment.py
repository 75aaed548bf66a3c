"""Round policy on real Flower SuperNodes over loopback (`fedtune serve`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from fedtune.checkpoint import Checkpoint, checkpoint_path
from fedtune.metrics import read_events

from ..conftest import ROOT
from .federation import Federation

pytestmark = pytest.mark.deployment


def last_round(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return -1
    return max((e["round"] for e in read_events(path, "round")), default=-1)


def wait_for_round(run_dir, rnd: int, proc, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while last_round(run_dir) < rnd:
        assert proc.poll() is None, f"fedtune serve ended early (exit {proc.returncode})"
        assert time.monotonic() < deadline, f"round {rnd} did not finish in time"
        time.sleep(0.1)


def fedavg_of_saved_updates(folder) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    weight = 0.0
    for path in sorted(folder.glob("client-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            w = float(f.metadata()["num_examples"])
            for key in f.keys():
                total[key] = total.get(key, 0) + f.get_tensor(key).double() * w
        weight += w
    return {k: (v / weight).float() for k, v in total.items()}


def test_killed_nodes_are_timeouts_and_quorum_decides(tmp_path):
    federation = Federation(tmp_path / "fed", partitions=list(range(6)))
    run_dir = tmp_path / "run"
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedtune.cli",
            "serve",
            "tiny",
            "--out",
            str(run_dir),
            "--superlink",
            federation.address,
            "--nodes",
            "6",
            "--set",
            "data.num_clients=6",
            "--set",
            "round.clients_per_round=6",
            "--set",
            "round.min_reports=3",
            "--set",
            "round.deadline_s=150",
            "--set",
            "run.rounds=3",
            "--set",
            "run.save_updates=true",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=federation.env,
    )
    try:
        wait_for_round(run_dir, 0, serve)  # discovery and the first evaluation are done
        time.sleep(1.0)
        federation.kill_node(4)
        federation.kill_node(5)
        wait_for_round(run_dir, 1, serve)
        time.sleep(1.0)
        for partition in (0, 1):
            federation.kill_node(partition)
        assert serve.wait(timeout=300) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        serve.kill()
        federation.stop()

    rounds = {e["round"]: e for e in read_events(run_dir / "metrics.jsonl", "round")}
    updates = list(read_events(run_dir / "metrics.jsonl", "client_update"))
    # Every SuperNode was sent the warm-up as discovery ended, none failed, and each
    # worker that trained had loaded the model once.
    (warm,) = read_events(run_dir / "metrics.jsonl", "warm_up")
    assert (warm["workers"], warm["failed"]) == (6, 0)
    assert {u["model_loads"] for u in updates if u["status"] == "ok"} == {1}

    # Round 1: 2 of 6 killed -> 4 survivors >= min_reports = 3: the round completes,
    # and its aggregate is the FedAvg of exactly the survivors' updates.
    assert rounds[1]["status"] == "ok" and rounds[1]["participants"] == 4
    assert rounds[1]["dropped"] + rounds[1]["rejected"] == 2
    ok1 = sorted(u["client"] for u in updates if u["round"] == 1 and u["status"] == "ok")
    assert ok1 == [0, 1, 2, 3]
    after1 = Checkpoint.from_bytes(checkpoint_path(run_dir / "checkpoints", 1).read_bytes())
    expected = fedavg_of_saved_updates(run_dir / "updates" / "round-00001")
    for key, value in expected.items():
        assert torch.allclose(after1.adapter[key], value, atol=1e-6), key

    # Round 2: 4 of 6 gone -> 2 < 3: abandoned, the adapter unchanged.
    assert rounds[2]["status"] == "abandoned" and rounds[2]["participants"] == 2
    after2 = Checkpoint.from_bytes(checkpoint_path(run_dir / "checkpoints", 2).read_bytes())
    assert all(torch.equal(after2.adapter[k], after1.adapter[k]) for k in after1.adapter)
    assert rounds[2]["perplexity"] == rounds[1]["perplexity"]

    # Round 3 still runs: the survivors train and report; the run ends cleanly.
    assert sorted(u["client"] for u in updates if u["round"] == 3 and u["status"] == "ok") == [2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["rounds_completed"] == 1
    assert all(u.get("reason") for u in updates if u["status"] != "ok")


SERVE_ARGS = [
    "--set",
    "data.num_clients=3",
    "--set",
    "round.clients_per_round=3",
    "--set",
    "round.min_reports=3",
    "--set",
    "run.rounds=2",
    "--set",
    "client.local_steps=2",
    "--set",
    "round.deadline_s=600",
]


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune.cli", "serve", *args]


def test_superlink_killed_mid_run_then_serve_resume_is_byte_identical(tmp_path):
    # Uninterrupted reference on its own federation.
    reference = tmp_path / "reference"
    federation = Federation(tmp_path / "fed-ref", partitions=[0, 1, 2])
    try:
        result = subprocess.run(
            serve_cmd(
                "tiny", "--out", str(reference), "--superlink", federation.address, *SERVE_ARGS
            ),
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=federation.env,
            timeout=400,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:
        federation.stop()

    # The same run; the whole server side (SuperLink and the ServerApp it started) is
    # SIGKILLed during round 2 (the last), then a new SuperLink comes up and the run is resumed.
    crashed = tmp_path / "crashed"
    federation = Federation(tmp_path / "fed-1", partitions=[0, 1, 2])
    serve = subprocess.Popen(
        serve_cmd("tiny", "--out", str(crashed), "--superlink", federation.address, *SERVE_ARGS),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=federation.env,
    )
    try:
        wait_for_round(crashed, 1, serve)
        time.sleep(0.5)
    finally:
        federation.stop()
        serve.wait(timeout=120)
    assert not (crashed / "summary.json").exists()
    assert serve.returncode != 0

    federation = Federation(tmp_path / "fed-2", partitions=[0, 1, 2])
    try:
        result = subprocess.run(
            serve_cmd("--resume", str(crashed), "--superlink", federation.address),
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=federation.env,
            timeout=400,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:
        federation.stop()
    assert "resuming" in result.stdout
    ref = (reference / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (crashed / "adapter" / "adapter_model.safetensors").read_bytes() == ref
    rounds = [e["round"] for e in read_events(crashed / "metrics.jsonl", "round")]
    assert rounds == [0, 1, 2]
