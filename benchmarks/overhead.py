"""fedtune's first performance figure: a scenario's cost, and its overhead over bare torch.

Runs ``fedtune simulate SCENARIO`` (with ``--in-process``: also ``fedtune simulate
--in-process``, the same run without Ray) and then ``bare_loop.py`` on the same run (the
same clients, steps, seeds and evaluations in one process), all in this one invocation,
and prints a Markdown table for ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/overhead.py [SCENARIO] [--in-process] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return elapsed, result.stdout


def fedtune_run(scenario: str, overrides: list[str], in_process: bool) -> dict[str, Any]:
    """``fedtune simulate`` (on Ray, or ``--in-process``) timed, with its run's figures."""
    from fedtune.metrics import read_events

    run_dir = Path(tempfile.mkdtemp(prefix="fedtune-bench-")) / "run"
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", scenario, "--out", str(run_dir)]
    cmd += ["--no-progress", *(["--in-process"] if in_process else []), *overrides]
    wall, _ = timed(cmd)
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [r for r in read_events(run_dir / "metrics.jsonl", "round") if r["round"] > 0]
    ok = [u for u in read_events(run_dir / "metrics.jsonl", "client_update") if u["status"] == "ok"]
    return {"run_dir": run_dir, "wall": wall, "summary": summary, "rounds": rounds, "ok": ok}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", default="quickstart")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="also run `fedtune simulate --in-process` (no Ray), in the same invocation",
    )
    args = parser.parse_args()

    # Warm the model cache so neither side pays the one-time GGUF conversion.
    from fedtune.config import load_scenario
    from fedtune.models.base import TINY, model_dir

    scenario = load_scenario(args.scenario, args.set)
    if scenario.model.name not in TINY:
        model_dir(scenario.model.name)

    overrides = [a for kv in args.set for a in ("--set", kv)]
    runs = {"Ray": fedtune_run(args.scenario, overrides, in_process=False)}
    if args.in_process:
        runs["in-process"] = fedtune_run(args.scenario, overrides, in_process=True)
    # The bare loop replays the sampled clients of the first run (the same seed samples
    # the same clients in every run).
    bare_wall, out = timed(
        [sys.executable, str(HERE / "bare_loop.py"), str(runs["Ray"]["run_dir"])]
    )
    bare = json.loads(out.strip().splitlines()[-1])

    def each(label: str, value: Callable[[dict[str, Any]], str]) -> tuple[str, ...]:
        return (label, *(value(run) for run in runs.values()))

    rows = [
        each("`fedtune simulate` wall time (whole command)", lambda r: f"{r['wall']:.1f} s"),
        each("**overhead ratio** fedtune ÷ bare", lambda r: f"**{r['wall'] / bare_wall:.2f}×**"),
        each(
            "wall time per round (mean of rounds)",
            lambda r: (
                f"{statistics.mean(x['wall_seconds'] for x in r['rounds']):.1f} s ("
                + ", ".join(f"{x['wall_seconds']:.1f}" for x in r["rounds"])
                + ")"
            ),
        ),
        each(
            "per-client training time (mean; first round's first client)",
            lambda r: (
                f"{statistics.mean(u['compute_seconds'] for u in r['ok']):.2f} s "
                f"({r['ok'][0]['compute_seconds']:.2f} s)"
            ),
        ),
        each(
            "per-client training CPU time (mean)",
            lambda r: f"{statistics.mean(u['cpu_seconds'] for u in r['ok']):.2f} s",
        ),
        each(
            "bytes up / down per client per round",
            lambda r: (
                f"{statistics.mean(u['bytes_up'] for u in r['ok']):,.0f} / "
                f"{statistics.mean(u['bytes_down'] for u in r['ok']):,.0f} B"
            ),
        ),
        each(
            "peak RSS, driver (ServerApp + evaluation)",
            lambda r: f"{r['summary']['server_peak_rss_mb']:.0f} MiB",
        ),
        each(
            "peak RSS reported by clients",
            lambda r: f"{max(u['peak_rss_mb'] for u in r['ok']):.0f} MiB",
        ),
        each(
            "held-out perplexity: before → after",
            lambda r: (
                f"{r['summary']['initial_perplexity']:.3f} → {r['summary']['final_perplexity']:.3f}"
            ),
        ),
    ]
    command = ["python benchmarks/overhead.py", *sys.argv[1:]]
    print(f"Command: `{' '.join(command)}`")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )
    print()
    print("| quantity | " + " | ".join(f"fedtune, {name}" for name in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print(f"Bare torch loop (the same work in one process, no Flower, no Ray): {bare_wall:.1f} s, ")
    print(
        f"per-client training {bare['client_train_seconds_mean']:.2f} s, peak RSS "
        f"{bare['peak_rss_mb']:.0f} MiB, held-out perplexity {bare['perplexities'][0]:.3f} → "
        f"{bare['perplexities'][-1]:.3f}."
    )


if __name__ == "__main__":
    main()
