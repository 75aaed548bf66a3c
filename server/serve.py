"""``fedtune serve``: run a scenario on a Flower SuperLink with real SuperNodes.

The deployment path is Flower's own: the run is submitted with ``flwr run`` to the
SuperLink's Control API; the SuperLink starts fedtune's ServerApp, and every
SuperNode (``flower-supernode --node-config "partition-id=N"``) runs fedtune's
warm ClientApp (:mod:`fedtune.clients.warm`: a worker per node keeps the model
loaded). fedtune writes what ``flwr run`` needs into the run folder — a minimal Flower
app (a pyproject naming fedtune's components, which must be installed where
the SuperLink and SuperNodes run) and a ``FLWR_HOME`` with one connection — and
streams the run's logs until it ends.

``fedtune serve`` holds the run folder's lock (:mod:`fedtune.rundir`) until ``flwr
run`` returns and tells the ServerApp so (``locked = true``). Secrets never reach
``scenario.toml`` (it is written redacted); they travel to the ServerApp in
``RUN_DIR/secrets.toml`` (mode 0600), deleted when the run ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedtune.config import Scenario, require_secrets, secrets_toml
from fedtune.errors import FedtuneError
from fedtune.metrics import SECRET_MODE, atomic_write_text
from fedtune.rundir import check_new_run_dir

SECRETS_FILE = "secrets.toml"

APP_PYPROJECT = """\
# Written by `fedtune serve`: a Flower app whose components live in the installed
# fedtune package.
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedtune-run"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "fedtune.server.app:app"
clientapp = "fedtune.clients.warm:app"

[tool.flwr.app.config]
scenario = "quickstart"
overrides = ""
out = ""
nodes = 0
resume = false
locked = false
secrets = ""
warm = true
"""


def _flwr() -> str:
    beside = Path(sys.executable).with_name("flwr")
    found = str(beside) if beside.exists() else shutil.which("flwr")
    if not found:
        raise FedtuneError("the `flwr` command is not installed: pip install 'flwr==1.41.0'")
    return found


def write_flower_files(
    run_dir: Path, superlink: str, root_certificates: Path | None
) -> tuple[Path, Path]:
    """The app folder and FLWR_HOME for ``flwr run`` (under ``run_dir/.flower``)."""
    base = run_dir / ".flower"
    app_dir, home = base / "app", base / "home"
    app_dir.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    atomic_write_text(app_dir / "pyproject.toml", APP_PYPROJECT)
    lines = [
        "[superlink]",
        'default = "fedtune"',
        "",
        "[superlink.fedtune]",
        f'address = "{superlink}"',
    ]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    atomic_write_text(home / "config.toml", "\n".join(lines) + "\n")
    return app_dir, home


def serve(
    scenario: Scenario,
    run_dir: Path,
    superlink: str = "127.0.0.1:8000",
    nodes: int = 0,
    resume: bool = False,
    root_certificates: Path | None = None,
) -> dict[str, Any]:
    """Submit ``scenario`` to the SuperLink at ``superlink``; wait; return the summary."""
    from fedtune.server.preflight import preflight, prepare_run_dir

    require_secrets(scenario)
    run_dir = Path(run_dir).resolve()
    if not resume:
        check_new_run_dir(run_dir)  # a file or a busy folder costs no preflight
    preflight(scenario)
    with prepare_run_dir(run_dir, resume=resume):
        return _submit(scenario, run_dir, superlink, nodes, resume, root_certificates)


def _submit(
    scenario: Scenario,
    run_dir: Path,
    superlink: str,
    nodes: int,
    resume: bool,
    root_certificates: Path | None,
) -> dict[str, Any]:
    """:func:`serve` once the run folder is locked."""
    import json

    if not resume:
        atomic_write_text(run_dir / "scenario.toml", scenario.to_toml())  # secrets redacted
    secrets = secrets_toml(scenario)
    secrets_path = run_dir / SECRETS_FILE
    if secrets:
        atomic_write_text(secrets_path, secrets, mode=SECRET_MODE)
    app_dir, home = write_flower_files(run_dir, superlink, root_certificates)
    run_config = (
        f'scenario="{run_dir / "scenario.toml"}" out="{run_dir}" nodes={int(nodes)} '
        f"resume={'true' if resume else 'false'} locked=true "
        f'secrets="{secrets_path if secrets else ""}"'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    try:
        result = subprocess.run(
            [_flwr(), "run", str(app_dir), "fedtune", "--run-config", run_config, "--stream"],
            env=env,
        )
    finally:
        secrets_path.unlink(missing_ok=True)  # the token is supplied again on resume
    summary_path = run_dir / "summary.json"
    if result.returncode != 0 or not summary_path.exists():
        raise FedtuneError(
            f"the run did not finish (flwr run exited {result.returncode}; no summary.json in "
            f"{run_dir}); continue it with `fedtune serve --resume {run_dir}`"
        )
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary
