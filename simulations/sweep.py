"""``fedtune sweep``: a grid of scenario overrides times seeds, run one after another.

Each point of the grid and each seed is its own run folder in the sweep folder, named
by its overrides (``strategy.name=fedprox,run.seed=1``), and ``sweep.json`` lists them
all. Run again, a sweep skips the runs that finished (they have ``summary.json``),
resumes those that stopped after a checkpoint, and starts the rest: an interrupted
sweep goes on where it stopped. ``fedtune compare SWEEP_DIR`` then tabulates and plots
them.
"""

from __future__ import annotations

import itertools
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.checkpoint import load_latest_checkpoint, resume_point
from fedtune.config import load_scenario, parse_override
from fedtune.errors import ConfigError
from fedtune.metrics import atomic_write_json
from fedtune.rundir import is_busy

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its overrides (the grid point and the seed) and folder."""

    overrides: tuple[str, ...]
    run_dir: Path


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["strategy.name=fedavg,fedprox", "client.lr=1e-3,5e-3"]`` -> key -> values.

    Each value stays text, parsed by the scenario loader as an override is.
    """
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ConfigError(f"--grid {item!r}: expected SECTION.KEY=V1,V2,...")
        parse_override(f"{key}=0")  # the key's shape, named in the error
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice")
        if key == "run.seed":
            raise ConfigError("--grid run.seed: use --seeds N")
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not options:
            raise ConfigError(f"--grid {key}: no values")
        grid[key] = options
    return grid


def plan(
    scenario: str, grid: dict[str, list[str]], seeds: int, sweep_dir: Path, base: Sequence[str] = ()
) -> list[SweepRun]:
    """Every grid point times seeds ``base seed .. base seed + seeds - 1``, each
    checked by loading its scenario (a bad value fails before any run starts)."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    first_seed = load_scenario(scenario, base).run.seed
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        for seed in range(first_seed, first_seed + seeds):
            point = tuple(f"{k}={v}" for k, v in zip(keys, values, strict=True))
            overrides = (*base, *point, f"run.seed={seed}")
            load_scenario(scenario, overrides)
            name = ",".join((*point, f"run.seed={seed}"))
            runs.append(SweepRun(overrides, sweep_dir / _folder_name(name)))
    return runs


def _folder_name(name: str) -> str:
    return re.sub(r"[^\w.,=+-]", "_", name)


def status(run: SweepRun) -> str:
    """``done`` (summary written), ``stopped`` (a checkpoint to resume) or ``new``."""
    if (run.run_dir / "summary.json").is_file():
        return "done"
    if load_latest_checkpoint(run.run_dir / "checkpoints") is not None:
        return "stopped"
    return "new"


Simulate = Callable[..., dict[str, Any]]
"""``simulate(scenario, run_dir, resume=checkpoint)``, as
:func:`fedtune.simulations.runner.simulate` is called."""


def run_sweep(
    scenario: str,
    runs: list[SweepRun],
    sweep_dir: Path,
    simulate: Simulate,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run each of ``runs`` not yet done, one after another; return their summaries."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        sweep_dir / SWEEP_FILE,
        {
            "scenario": scenario,
            "runs": [{"dir": r.run_dir.name, "overrides": list(r.overrides)} for r in runs],
        },
    )
    summaries = []
    for number, run in enumerate(runs, start=1):
        state = status(run)
        label = f"[{number}/{len(runs)}] {run.run_dir.name}"
        if state == "done":
            say(f"{label}: finished before, skipped")
        elif state == "stopped":
            resumed, checkpoint = resume_point(run.run_dir, load_scenario(scenario, run.overrides))
            say(f"{label}: resuming after round {checkpoint.round}")
            simulate(resumed, run.run_dir, resume=checkpoint)
        else:
            say(f"{label}: starting")
            if run.run_dir.exists() and not is_busy(run.run_dir):
                shutil.rmtree(run.run_dir)  # stopped before its first checkpoint: nothing kept
            simulate(load_scenario(scenario, run.overrides), run.run_dir)
        summaries.append(_summary(run))
    return summaries


def _summary(run: SweepRun) -> dict[str, Any]:
    import json

    return dict(json.loads((run.run_dir / "summary.json").read_text()))
