"""``fedtune simulate``: check the scenario, then run it on Flower's simulation engine.

Everything that bad input can break — the model package, the data, every client's
partition, the strategy name — is checked here, in the driver, before Ray starts, so a
mistake costs a second and one clear line, and leaves no ``summary.json`` behind.
"""

from __future__ import annotations

import logging
import os
import tomllib
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.config import Scenario
from fedtune.errors import FedtuneError

if TYPE_CHECKING:
    from fedtune.checkpoint import Checkpoint


def preflight(scenario: Scenario) -> int:
    """Check that ``scenario`` can run; return the number of training clients."""
    from fedtune.data import build_population, client_train_chunks, eval_chunks
    from fedtune.engines import get_engine
    from fedtune.models import load_tokenizer, model_dir
    from fedtune.models.base import TINY
    from fedtune.strategies import build_strategy

    get_engine(scenario.client.engine)
    if scenario.model.name not in TINY:
        model_dir(scenario.model.name)  # converts SmolLM2 once, before actors race for it
    population = build_population(scenario.data)
    tokenizer = load_tokenizer(scenario.model.name)
    for client in population.train:
        client_train_chunks(tokenizer, client, scenario.data, scenario.client.seq_len)
    eval_chunks(tokenizer, population, scenario.data, scenario.client.seq_len)
    if scenario.round.clients_per_round > len(population.train):
        raise FedtuneError(
            f"round.clients_per_round = {scenario.round.clients_per_round} exceeds the "
            f"{len(population.train)} training clients: lower it or raise data.num_clients"
        )
    build_strategy(
        scenario.strategy.name, dict(scenario.strategy.params),
        population=len(population.train), clients_per_round=scenario.round.clients_per_round,
    )
    return len(population.train)


def prepare_run_dir(run_dir: Path) -> Path:
    """Refuse a folder that already holds a run: a finished one or an unfinished one."""
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").exists():
        raise FedtuneError(f"{run_dir} already holds a finished run: choose another --out")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FedtuneError(f"{run_dir} is not empty: choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def resume_point(
    run_dir: Path, requested: Scenario | None, allow_config_change: bool = False
) -> tuple[Scenario, Checkpoint]:
    """The scenario and checkpoint to resume ``run_dir`` from.

    ``requested`` (a scenario given on the command line) must equal the checkpoint's,
    or the differing keys are named and resuming is refused, unless
    ``allow_config_change``.
    """
    from fedtune.checkpoint import load_latest_checkpoint
    from fedtune.config import scenario_from_dict

    run_dir = Path(run_dir)
    if (run_dir / "summary.json").exists():
        raise FedtuneError(f"{run_dir} holds a finished run (summary.json): nothing to resume")
    checkpoint = load_latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise FedtuneError(f"{run_dir} has no valid checkpoint to resume from: start a new run")
    saved = scenario_from_dict(tomllib.loads(checkpoint.scenario_toml),
                               source=f"{run_dir} checkpoint", name=checkpoint.scenario_name)
    if requested is None:
        return saved, checkpoint
    differing = config_differences(saved, requested)
    if differing and not allow_config_change:
        raise FedtuneError(
            f"the scenario differs from the checkpoint's in {', '.join(differing)}: resume "
            "without a scenario, or pass --allow-config-change"
        )
    return replace(requested, name=saved.name), checkpoint


def config_differences(a: Scenario, b: Scenario) -> list[str]:
    """Dotted keys whose values differ between two scenarios."""
    from fedtune.config import SECTIONS, section_values

    keys = []
    for section in SECTIONS:
        va, vb = section_values(a, section), section_values(b, section)
        keys += [f"{section}.{k}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
    return keys


def simulate(
    scenario: Scenario, run_dir: Path, progress: bool = True, verbose: bool = False,
    resume: Checkpoint | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` on Flower's simulation engine (Ray); return the summary.

    With ``resume`` (see :func:`resume_point`), continue the run in ``run_dir``.
    """
    import json

    population = preflight(scenario)
    run_dir = prepare_run_dir(run_dir) if resume is None else Path(run_dir)
    num_nodes = scenario.simulation.num_supernodes or population

    from flwr.simulation import run_simulation

    from fedtune.clients.app import app as client_app
    from fedtune.server.app import make_server_app

    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": min(scenario.simulation.client_cpus, cpus), "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "include_dashboard": False,
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
        },
    }
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    observer = RichProgress(scenario) if progress else None
    server_app = make_server_app(scenario, run_dir, observer, expected_nodes=num_nodes,
                                 resume=resume)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_nodes,
            backend_config=backend_config,  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    finally:
        if observer is not None:
            observer.close()
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise FedtuneError(f"the simulation ended without finishing the run in {run_dir}")
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary


class RichProgress:
    """Progress on screen: a bar of rounds and one of clients, loss, perplexity, bytes."""

    def __init__(self, scenario: Scenario) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        from rich.progress import TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
        )
        self.rounds = self.progress.add_task("rounds", total=scenario.run.rounds, info="")
        self.clients = self.progress.add_task("clients", total=0, info="", visible=False)
        self.bytes = 0
        self.progress.start()

    def run_started(self, scenario: Scenario, initial_perplexity: float) -> None:
        self.console.print(f"held-out perplexity before round 1: {initial_perplexity:.3f}")
        self.progress.update(self.rounds, info=f"ppl {initial_perplexity:.3f}")

    def round_started(self, rnd: int, sampled: int) -> None:
        self.progress.reset(self.clients, total=sampled, visible=True,
                            description=f"round {rnd} clients", info="")

    def client_done(self, rnd: int, event: dict[str, Any]) -> None:
        self.bytes += int(event.get("bytes_up") or 0) + int(event.get("bytes_down") or 0)
        loss = event.get("loss")
        info = f"loss {loss:.3f}" if isinstance(loss, float) else event.get("status", "")
        self.progress.advance(self.clients)
        self.progress.update(self.clients, info=f"{info}  {self.bytes / 1e6:.1f} MB moved")

    def round_ended(self, event: dict[str, Any]) -> None:
        ppl = event.get("perplexity")
        self.progress.advance(self.rounds)
        self.progress.update(self.rounds, info=f"ppl {ppl:.3f}" if ppl is not None else "")
        self.console.print(
            f"round {event['round']}: perplexity {ppl:.3f}, {event['participants']} updates, "
            f"{event['rejected']} rejected, {event['dropped']} dropped, "
            f"{event['wall_seconds']:.1f} s"
        )

    def close(self) -> None:
        self.progress.stop()
