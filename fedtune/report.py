"""Plots and a Markdown report of a run folder (``fedtune report RUN_DIR``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError
from fedtune.metrics import atomic_write_text, read_events


def plot_perplexity(run_dir: Path) -> Path:
    """``perplexity.png``: held-out perplexity before round 1 (round 0) and after each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    rounds = list(read_events(run_dir / "metrics.jsonl", "round"))
    xs = [r["round"] for r in rounds if r.get("perplexity") is not None]
    ys = [r["perplexity"] for r in rounds if r.get("perplexity") is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(xs, ys, marker="o")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, run_dir / "perplexity.png")


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as ``path`` (PNG) via a temp file and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(run_dir: Path) -> Path:
    """``report.md`` with the round table and the plot; needs ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FedtuneError(f"{run_dir} is not a run folder (no metrics.jsonl)")
    plot = plot_perplexity(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    lines = [f"# fedtune run `{run_dir.name}`", ""]
    if not summary:
        lines += ["**Unfinished**: no summary.json (the run stopped early).", ""]
    else:
        lines += [
            f"Scenario `{summary.get('scenario')}`, {summary.get('rounds_completed')} rounds, "
            f"perplexity {summary.get('initial_perplexity'):.3f} -> "
            f"{summary.get('final_perplexity'):.3f}, {summary.get('wall_seconds'):.1f} s.",
            "",
        ]
    lines += [
        "| round | perplexity | participants | rejected | train loss | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in read_events(run_dir / "metrics.jsonl", "round"):
        ppl = r.get("perplexity")
        loss = r.get("train_loss")
        lines.append(
            f"| {r['round']} | {ppl:.3f} | {r.get('participants', 0)} | {r.get('rejected', 0)} | "
            f"{'' if loss is None else f'{loss:.4f}'} | {r.get('wall_seconds', 0):.1f} |"
            if ppl is not None
            else f"| {r['round']} | | {r.get('participants', 0)} | {r.get('rejected', 0)} | | |"
        )
    lines += ["", f"![perplexity]({plot.name})", ""]
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out
