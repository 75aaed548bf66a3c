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
    """``report.md``: the outcome, one row per round (abandoned rounds marked, bytes,
    participation per tier, simulated and wall time, epsilon), the clients that were
    dropped or rejected with their reasons, and the plot; needs ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FedtuneError(f"{run_dir} is not a run folder (no metrics.jsonl)")
    plot = plot_perplexity(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    rounds = list(read_events(run_dir / "metrics.jsonl", "round"))
    clients = list(read_events(run_dir / "metrics.jsonl", "client_update"))
    abandoned = [r["round"] for r in rounds if r.get("status") == "abandoned"]
    lines = [f"# fedtune run `{run_dir.name}`", ""]
    if not summary:
        lines += ["**Unfinished**: no summary.json (the run stopped early).", ""]
    else:
        ran = max((r["round"] for r in rounds), default=0)
        lines += [
            f"Scenario `{summary.get('scenario')}`: {ran} of {summary.get('rounds')} rounds run, "
            f"{ran - len(abandoned)} aggregated, {len(abandoned)} abandoned; perplexity "
            f"{_num(summary.get('initial_perplexity'), 3)} -> "
            f"{_num(summary.get('final_perplexity'), 3)}; "
            f"{summary.get('bytes_up', 0) / 1e6:.2f} MB up, "
            f"{summary.get('bytes_down', 0) / 1e6:.2f} MB down; "
            f"{_num(summary.get('wall_seconds'), 1)} s wall"
            + (
                f", {summary['simulated_seconds']:.1f} s simulated"
                if "simulated_seconds" in summary
                else ""
            )
            + ".",
            "",
        ]
    lines += [
        "| round | status | perplexity | participants / sampled | by tier | rejected | dropped "
        "| train loss | MB up | MB down | wall s | simulated s | epsilon |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        status = r.get("status", "start" if r["round"] == 0 else "ok")
        if status == "abandoned":
            status = f"**abandoned**: {r.get('reason', '')}"
        tiers = r.get("participants_by_tier") or {}
        lines.append(
            f"| {r['round']} | {status} | {_num(r.get('perplexity'), 3)} "
            f"| {r.get('participants', 0)} / {r.get('sampled', 0)} "
            f"| {' '.join(f'{k}:{v}' for k, v in sorted(tiers.items()))} "
            f"| {r.get('rejected', 0)} | {r.get('dropped', 0)} | {_num(r.get('train_loss'), 4)} "
            f"| {r.get('bytes_up', 0) / 1e6:.3f} | {r.get('bytes_down', 0) / 1e6:.3f} "
            f"| {_num(r.get('wall_seconds'), 1)} | {_num(r.get('simulated_seconds'), 1)} "
            f"| {_num(r.get('epsilon'), 3)} |"
        )
    lines += score_table(rounds)
    left_out = [c for c in clients if c.get("status") in ("rejected", "dropped")]
    if left_out:
        lines += ["", "## Dropped and rejected clients", "", "| round | client | status | reason |"]
        lines += ["|---|---|---|---|"]
        lines += [
            f"| {c.get('round')} | {c.get('client')} | {c['status']} | {c.get('reason', '')} |"
            for c in left_out
        ]
    lines += ["", f"![perplexity]({plot.name})", ""]
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out


SCORE_FIELDS = {"client_perplexity_mean", "client_perplexity_worst_decile"}
"""Per-client evaluation's fields of a ``round`` event (``[evaluation] clients``)."""
NOT_METRICS = {
    "round", "status", "reason", "perplexity", "participants", "sampled", "rejected",
    "dropped", "train_loss", "bytes_up", "bytes_down", "wall_seconds", "simulated_seconds",
    "server_peak_rss_mb", "epsilon", "event", "time", "client_perplexity",
}  # fmt: skip


def score_table(rounds: list[dict[str, Any]]) -> list[str]:
    """Report lines of the scores beyond perplexity (``[evaluation]``): per-client
    perplexity (mean, worst decile) and each generation metric, per round; none when
    the run scored nothing else."""
    metrics = sorted(
        {
            k
            for r in rounds
            for k, v in r.items()
            if k not in NOT_METRICS and k not in SCORE_FIELDS and isinstance(v, float)
        }
        & {k for r in rounds if r["round"] == 0 for k in r}
    )
    per_client = any("client_perplexity_mean" in r for r in rounds)
    if not metrics and not per_client:
        return []
    heads = ["round"]
    if per_client:
        heads += ["client perplexity: mean", "worst decile", "clients"]
    heads += metrics
    lines = ["", "## Scores beyond perplexity", "", "| " + " | ".join(heads) + " |"]
    lines.append("|" + "---|" * len(heads))
    for r in rounds:
        if not any(k in r for k in (*metrics, "client_perplexity_mean")):
            continue
        cells = [str(r["round"])]
        if per_client:
            cells += [
                _num(r.get("client_perplexity_mean"), 3),
                _num(r.get("client_perplexity_worst_decile"), 3),
                str(len(r.get("client_perplexity") or {})),
            ]
        cells += [_num(r.get(m), 4) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _num(value: Any, digits: int) -> str:
    """A number for a table cell; empty where there is none (or it was not finite)."""
    return f"{value:.{digits}f}" if isinstance(value, int | float) else ""
