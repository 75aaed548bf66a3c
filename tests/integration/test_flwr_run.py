"""README's `flwr run .` command, run exactly as written, on Flower's local SuperLink."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess

import pytest

from fedtune.errors import FedtuneError
from fedtune.metrics import read_events
from fedtune.server.loop import check_discovered

from ..conftest import ROOT

pytestmark = pytest.mark.deployment

APP_PARTS = (
    "pyproject.toml",
    "README.md",
    "fedtune",
    "server",
    "clients",
    "strategies",
    "simulations",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_block(containing: str) -> str:
    """The README's fenced shell block holding ``containing``."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"README should hold one sh block with {containing!r}"
    return found[0]


def test_readme_flwr_run_command(tmp_path):
    """The block runs verbatim in a copy of the checkout (so its `runs/x` lands in
    tmp_path): a fresh FLWR_HOME, Flower starts its local SuperLink, the run finishes."""
    command = readme_block("flwr run .")
    app = tmp_path / "checkout"
    app.mkdir()
    for part in APP_PARTS:
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, app / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, app / part)
    (app / ".venv").symlink_to(ROOT / ".venv")  # the block puts $PWD/.venv/bin on PATH
    home = tmp_path / "flwr-home"
    # Flower's local SuperLink listens on fixed ports unless told otherwise: free ones,
    # so that a SuperLink a developer left running is not the one this run talks to.
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)  # the block must set it
    try:
        for _ in range(2):
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", command],
                cwd=app,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            # Flower gives its local SuperLink a fixed 15 s to start (flwr/cli/
            # local_superlink.py), which a loaded 2-core machine can miss: once more.
            if "Failed to start local SuperLink within" not in done.stdout + done.stderr:
                break
    finally:
        # Flower leaves its local SuperLink running (with the SuperExec and simulation
        # processes it started); each names a path under tmp_path on its command line.
        subprocess.run(["pkill", "-f", str(tmp_path)], check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = app / "runs" / "x"
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [e for e in read_events(run_dir / "metrics.jsonl", "round") if e["round"] > 0]
    assert [(e["round"], e["status"], e["participants"]) for e in rounds] == [
        (1, "ok", 3),
        (2, "ok", 3),
    ]
    assert summary["rounds_completed"] == 2
    assert (run_dir / "adapter" / "adapter_config.json").exists()


def test_too_few_nodes_is_an_error_not_a_wait():
    check_discovered(6, 3)
    with pytest.raises(FedtuneError, match="num-supernodes=N"):
        check_discovered(2, 3)
