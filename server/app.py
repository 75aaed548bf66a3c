"""fedtune's Flower ServerApp.

``fedtune simulate`` builds one with :func:`make_server_app` around an already
resolved scenario; ``flwr run`` (and ``fedtune serve``, which calls it) uses the
module-level ``app``, which reads from the run config (``[tool.flwr.app.config]``):
``scenario`` (a shipped name or a TOML path), ``overrides`` (``section.key=value``
separated by spaces), ``out`` (the run folder), ``nodes`` (SuperNodes to wait for;
0 = one per training client) and ``resume`` (continue the run in ``out``).

With ``[gateway] enabled = true`` the ServerApp also hosts the device gateway
(:mod:`fedtune.server.gateway`) for the whole run: enrolled phones are nodes too.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.checkpoint import Checkpoint, resume_point
from fedtune.config import Scenario, load_scenario
from fedtune.errors import FedtuneError
from fedtune.server.gateway import hosted_gateway
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
        if scenario is not None:
            out = run_dir or default_run_dir(scenario)
            with hosted_gateway(scenario, grid, out) as nodes:  # phones join as nodes
                run_federation(
                    nodes, scenario, out, observer, expected_nodes=expected_nodes, resume=resume
                )
            return
        cfg = context.run_config
        resolved = load_scenario(
            str(cfg.get("scenario", "quickstart")), str(cfg.get("overrides", "")).split()
        )
        out = Path(str(cfg["out"])) if cfg.get("out") else default_run_dir(resolved)
        checkpoint = None
        if bool(cfg.get("resume", False)):
            resolved, checkpoint = resume_point(out, resolved)
        elif (out / "summary.json").exists():
            raise FedtuneError(f"{out} already holds a finished run: choose another out")
        with hosted_gateway(resolved, grid, out) as nodes:
            run_federation(
                nodes,
                resolved,
                out,
                observer,
                expected_nodes=int(cfg.get("nodes", 0)) or None,
                resume=checkpoint,
            )

    return app


app = make_server_app()
