"""fedtune's Flower ServerApp.

``fedtune simulate`` builds one with :func:`make_server_app` around an already
resolved scenario; ``flwr run`` (and ``fedtune serve``, which calls it) uses the
module-level ``app``, which reads from the run config (``[tool.flwr.app.config]``):
``scenario`` (a shipped name or a TOML path), ``overrides`` (``section.key=value``
separated by spaces), ``out`` (the run folder), ``nodes`` (SuperNodes to wait for;
0 = one per training client) and ``resume`` (continue the run in ``out``);
``fedtune serve`` adds ``locked`` (it holds the run folder's lock itself), ``secrets``
(a 0600 file with the secrets ``scenario.toml`` holds redacted) and ``warm`` (its nodes
run ``fedtune.clients.warm:app``: each is sent a warm-up before round 1). Started by
``flwr run`` directly, the ServerApp takes the run folder's lock for the run.

With ``[gateway] enabled = true`` the ServerApp also hosts the device gateway
(:mod:`fedtune.server.gateway`) for the whole run: enrolled phones are nodes too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.checkpoint import Checkpoint, resume_point
from fedtune.config import Scenario, load_scenario, require_secrets, secret_overrides
from fedtune.errors import RunInterrupted
from fedtune.rundir import lock_run_dir
from fedtune.server.gateway import hosted_gateway
from fedtune.server.grid import StoppableGrid
from fedtune.server.loop import Observer, run_federation, warm_up


def default_run_dir(scenario: Scenario) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{scenario.name}"


def make_server_app(
    scenario: Scenario | None = None,
    run_dir: Path | None = None,
    observer: Observer | None = None,
    expected_nodes: int | None = None,
    resume: Checkpoint | None = None,
    stop: threading.Event | None = None,
    known_nodes: Mapping[int, int] | None = None,
    warm_workers: int = 0,
    gate: Callable[[], bool] | None = None,
) -> ServerApp:
    """A ServerApp running ``scenario`` (or the one named in the run config).

    Once ``stop`` is set, the run ends at its next grid call, keeping its last
    checkpoint, and the ServerApp returns without a summary (``fedtune simulate``'s
    Ctrl-C: the caller, which set ``stop``, reports it). ``known_nodes``: node -> client
    index of the simulation engine's virtual nodes, which discovery need not ask;
    ``warm_workers``: its worker count, sent a warm-up first thing
    (:func:`~fedtune.server.loop.warm_up`); ``gate``: called next, before anything is
    written: False ends the run there (``fedtune simulate`` waits in it for its
    preflight and takes the run folder's lock).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if scenario is not None:
            out = run_dir or default_run_dir(scenario)
            # The workers load the model while the gate's checks finish and the server
            # evaluates the initial adapter.
            warming = warm_up(grid, scenario, warm_workers)
            if gate is not None and not gate():
                return
            try:
                # Phones join as nodes; the stop check wraps them too.
                with hosted_gateway(scenario, grid, out) as nodes:
                    nodes = StoppableGrid(nodes, stop) if stop is not None else nodes
                    run_federation(
                        nodes,
                        scenario,
                        out,
                        observer,
                        expected_nodes=expected_nodes,
                        resume=resume,
                        known_nodes=known_nodes,
                        warming=warming,
                    )
            except RunInterrupted:
                # Return normally: Flower waits 3 s more for a ServerApp that raised.
                pass
            return
        cfg = context.run_config
        overrides = str(cfg.get("overrides", "")).split()
        if cfg.get("secrets"):
            overrides += secret_overrides(str(cfg["secrets"]))
        resolved = load_scenario(str(cfg.get("scenario", "quickstart")), overrides)
        out = Path(str(cfg["out"])) if cfg.get("out") else default_run_dir(resolved)
        resuming = bool(cfg.get("resume", False))
        # Under `fedtune serve` the launching command holds the lock; started by `flwr
        # run` alone, the ServerApp holds it (and refuses a busy or finished folder).
        lock = None if bool(cfg.get("locked", False)) else lock_run_dir(out, new=not resuming)
        try:
            nodes = int(cfg.get("nodes", 0))
            warm = bool(cfg.get("warm", False))
            _deployed(grid, resolved, out, observer, nodes, resuming, warm)
        finally:
            if lock is not None:
                lock.release()

    return app


def _deployed(
    grid: Grid,
    resolved: Scenario,
    out: Path,
    observer: Observer | None,
    nodes_expected: int,
    resume: bool,
    warm: bool,
) -> None:
    """The ServerApp's run under deployment, once the run folder is locked. ``warm``:
    the nodes run ``fedtune.clients.warm:app``: send each a warm-up after discovery."""
    checkpoint = None
    if resume:
        resolved, checkpoint = resume_point(out, resolved, locked=True)
    require_secrets(resolved)
    with hosted_gateway(resolved, grid, out) as nodes:
        run_federation(
            nodes,
            resolved,
            out,
            observer,
            expected_nodes=nodes_expected or None,
            resume=checkpoint,
            warm_nodes=warm,
        )


app = make_server_app()
