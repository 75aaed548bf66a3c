"""fedtune's first performance figure: a scenario's cost, and its overhead over bare torch.

Runs ``fedtune simulate SCENARIO`` and then ``bare_loop.py`` on the same run (the same
clients, steps, seeds and evaluations in one process), both in this one invocation,
and prints a Markdown table for ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/overhead.py [SCENARIO] [--set k=v ...]
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
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return elapsed, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", default="quickstart")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()

    # Warm the model cache so neither side pays the one-time GGUF conversion.
    from fedtune.config import load_scenario
    from fedtune.metrics import read_events
    from fedtune.models.base import TINY, model_dir

    scenario = load_scenario(args.scenario, args.set)
    if scenario.model.name not in TINY:
        model_dir(scenario.model.name)

    run_dir = Path(tempfile.mkdtemp(prefix="fedtune-bench-")) / "run"
    overrides = [a for kv in args.set for a in ("--set", kv)]
    fed_wall, _ = timed(
        [
            sys.executable,
            "-m",
            "fedtune.cli",
            "simulate",
            args.scenario,
            "--out",
            str(run_dir),
            "--no-progress",
            *overrides,
        ]
    )
    bare_wall, out = timed([sys.executable, str(HERE / "bare_loop.py"), str(run_dir)])
    bare = json.loads(out.strip().splitlines()[-1])

    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [r for r in read_events(run_dir / "metrics.jsonl", "round") if r["round"] > 0]
    updates = list(read_events(run_dir / "metrics.jsonl", "client_update"))
    ok = [u for u in updates if u["status"] == "ok"]
    per_round = ", ".join(f"{r['wall_seconds']:.1f}" for r in rounds)
    rows = [
        ("`fedtune simulate` wall time (whole command)", f"{fed_wall:.1f} s"),
        ("bare torch loop wall time (same work, one process)", f"{bare_wall:.1f} s"),
        ("**overhead ratio** fedtune ÷ bare", f"**{fed_wall / bare_wall:.2f}×**"),
        (
            "wall time per round (mean of rounds)",
            f"{statistics.mean(r['wall_seconds'] for r in rounds):.1f} s ({per_round})",
        ),
        (
            "per-client training time, fedtune (mean)",
            f"{statistics.mean(u['compute_seconds'] for u in ok):.2f} s",
        ),
        (
            "per-client training time, bare loop (mean)",
            f"{bare['client_train_seconds_mean']:.2f} s",
        ),
        ("bytes up per client per round", f"{statistics.mean(u['bytes_up'] for u in ok):,.0f} B"),
        (
            "bytes down per client per round",
            f"{statistics.mean(u['bytes_down'] for u in ok):,.0f} B",
        ),
        ("peak RSS, driver (ServerApp + evaluation)", f"{summary['server_peak_rss_mb']:.0f} MiB"),
        ("peak RSS, client process (Ray actor)", f"{max(u['peak_rss_mb'] for u in ok):.0f} MiB"),
        ("peak RSS, bare loop process", f"{bare['peak_rss_mb']:.0f} MiB"),
        (
            "held-out perplexity fedtune: before → after",
            f"{summary['initial_perplexity']:.3f} → {summary['final_perplexity']:.3f}",
        ),
        (
            "held-out perplexity bare loop: before → after",
            f"{bare['perplexities'][0]:.3f} → {bare['perplexities'][-1]:.3f}",
        ),
    ]
    print(f"Command: `python benchmarks/overhead.py {args.scenario} {' '.join(overrides)}`".strip())
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )
    print()
    print("| quantity | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
