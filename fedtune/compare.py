"""``fedtune compare RUN...``: runs grouped by configuration, mean +- std over seeds.

Runs whose scenarios differ only in ``run.seed`` form one group, named by the keys in
which the groups differ (``strategy.name=fedprox``). A sweep folder (``sweep.json``)
stands for all its runs. Writes ``compare.md`` (the table and the plot), ``compare.csv``
and ``compare.png`` (held-out perplexity per round: each group's mean, +- one std
shaded).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config import Scenario, load_scenario
from fedtune.errors import FedtuneError
from fedtune.metrics import atomic_write_text, read_events
from fedtune.report import save_figure

SEED_KEY = "run.seed"


@dataclass
class RunResult:
    """What a run folder says: its scenario, perplexity per round and summary."""

    run_dir: Path
    scenario: Scenario
    perplexity: dict[int, float]
    """Round -> held-out perplexity after it (0: before training); finite values only."""
    summary: dict[str, Any] = field(default_factory=dict)
    """``summary.json`` ({} for a run that did not finish)."""


def run_folders(paths: Iterable[Path]) -> list[Path]:
    """The run folders named, a sweep folder standing for all its runs."""
    found: list[Path] = []
    for path in map(Path, paths):
        sweep = path / "sweep.json"
        if sweep.is_file():
            found += [path / r["dir"] for r in json.loads(sweep.read_text())["runs"]]
        else:
            found.append(path)
    return found


def load_run(run_dir: Path) -> RunResult:
    run_dir = Path(run_dir)
    for name in ("scenario.toml", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise FedtuneError(f"{run_dir} is not a run folder (no {name})")
    perplexity = {
        int(e["round"]): float(e["perplexity"])
        for e in read_events(run_dir / "metrics.jsonl", "round")
        if isinstance(e.get("perplexity"), int | float)
    }
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return RunResult(run_dir, load_scenario(run_dir / "scenario.toml"), perplexity, summary)


def group_runs(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    """Runs grouped by their scenario without the seed; each group named by the keys
    that differ between groups (``all`` when none does)."""
    from fedtune.checkpoint import config_differences

    differing = sorted(
        {k for r in runs[1:] for k in config_differences(runs[0].scenario, r.scenario)} - {SEED_KEY}
    )
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        label = ",".join(f"{k}={_value(run.scenario, k)}" for k in differing) or "all"
        groups.setdefault(label, []).append(run)
    return groups


def _value(scenario: Scenario, dotted: str) -> str:
    from fedtune.config import section_values

    section, key = dotted.split(".", 1)
    value = section_values(scenario, section).get(key)
    return value if isinstance(value, str) else json.dumps(value)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table_rows(groups: dict[str, list[RunResult]]) -> list[dict[str, Any]]:
    """One row a group: seeds, rounds completed, final perplexity, bytes, wall time."""
    rows = []
    for label, runs in groups.items():
        finished = [r for r in runs if r.summary]
        final, final_std = _mean_std([r.perplexity[max(r.perplexity)] for r in finished])
        best, best_std = _mean_std([min(r.perplexity.values()) for r in finished])
        rows.append(
            {
                "group": label,
                "runs": len(runs),
                "finished": len(finished),
                "seeds": " ".join(str(r.scenario.run.seed) for r in runs),
                "rounds_completed": _mean_std(
                    [float(r.summary["rounds_completed"]) for r in finished]
                )[0],
                "final_perplexity": final,
                "final_perplexity_std": final_std,
                "best_perplexity": best,
                "best_perplexity_std": best_std,
                "mb_up": _mean_std([r.summary.get("bytes_up", 0) / 1e6 for r in finished])[0],
                "mb_down": _mean_std([r.summary.get("bytes_down", 0) / 1e6 for r in finished])[0],
                "wall_seconds": _mean_std([r.summary.get("wall_seconds", 0.0) for r in finished])[
                    0
                ],
            }
        )
    return rows


def plot_groups(groups: dict[str, list[RunResult]], out: Path) -> Path:
    """Each group's mean held-out perplexity per round, +- one std shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, runs in groups.items():
        rounds = sorted(set.intersection(*(set(r.perplexity) for r in runs)))
        stats = [_mean_std([r.perplexity[n] for r in runs]) for n in rounds]
        means = [m for m, _ in stats]
        ax.plot(rounds, means, marker="o", label=f"{label} (n={len(runs)})")
        ax.fill_between(rounds, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel("held-out perplexity (mean +- std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out / "compare.png")


def compare(paths: Iterable[Path], out: Path) -> Path:
    """Write ``compare.md``, ``compare.csv`` and ``compare.png`` to ``out``; return the
    Markdown file."""
    folders = run_folders(paths)
    if not folders:
        raise FedtuneError("fedtune compare needs at least one run folder")
    runs = [load_run(f) for f in folders]
    groups = group_runs(runs)
    rows = table_rows(groups)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_groups(groups, out)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "compare.csv", buffer.getvalue())
    lines = [
        f"# fedtune compare: {len(runs)} runs in {len(groups)} groups",
        "",
        "| group | finished / runs | seeds | final perplexity | best perplexity "
        "| rounds | MB up | MB down | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['group']} | {row['finished']} / {row['runs']} | {row['seeds']} "
            f"| {row['final_perplexity']:.3f} +- {row['final_perplexity_std']:.3f} "
            f"| {row['best_perplexity']:.3f} +- {row['best_perplexity_std']:.3f} "
            f"| {row['rounds_completed']:.1f} | {row['mb_up']:.2f} | {row['mb_down']:.2f} "
            f"| {row['wall_seconds']:.1f} |"
        )
    lines += ["", "Runs:", ""]
    lines += [f"- `{r.run_dir}`{'' if r.summary else ' (unfinished)'}" for r in runs]
    lines += ["", f"![perplexity per round]({plot.name})", ""]
    path = out / "compare.md"
    atomic_write_text(path, "\n".join(lines))
    return path
