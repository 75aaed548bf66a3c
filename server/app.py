"""fedtune's Flower ServerApp.

``fedtune simulate`` builds one with :func:`make_server_app` around an already
resolved scenario; ``flwr run .`` uses the module-level ``app``, which reads the
scenario name, overrides and output folder from the run config (``[tool.flwr.app.config]``
in pyproject.toml, or ``--run-config``).
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.checkpoint import Checkpoint
from fedtune.config import Scenario, load_scenario
from fedtune.server.loop import Observer, run_federation


def default_run_dir(scenario: Scenario) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{scenario.name}"


def make_server_app(
    scenario: Scenario | None = None,
    run_dir: Path | None = None,
    observer: Observer | None = None,
    expected_nodes: int | None = None,
    resume: Checkpoint | None = None,
) -> ServerApp:
    """A ServerApp running ``scenario`` (or the one named in the run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        resolved = scenario
        out = run_dir
        nodes = expected_nodes
        if resolved is None:
            cfg = context.run_config
            overrides = str(cfg.get("overrides", "")).split()
            resolved = load_scenario(str(cfg.get("scenario", "quickstart")), overrides)
            out = Path(str(cfg["out"])) if cfg.get("out") else None
            nodes = int(cfg.get("nodes", 0)) or None
        run_federation(
            grid, resolved, out or default_run_dir(resolved), observer, expected_nodes=nodes,
            resume=resume,
        )

    return app


app = make_server_app()
