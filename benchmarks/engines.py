"""The local training engines side by side on the quickstart federation, same seeds.

Runs ``fedtune simulate quickstart`` (SmolLM2-135M, 24 Shakespeare clients, 3 per
round, 3 rounds) once per engine with the quickstart's 4 local steps ("equal steps"),
then once more per gradient-free engine with as many local steps as fit in backprop's
client compute time per round ("equal time": the same client compute budget a round,
the same rounds, the same server evaluation). Compute time is the client's CPU seconds
(all its threads) of its fastest round: on an idle host that is wall time times the
threads torch uses, the same for every engine. Prints a Markdown table for
``benchmarks/RESULTS.md``: bytes up and down per client-round, client peak RSS
(resident memory during a client's training call), wall and CPU seconds per local
step, and held-out perplexity after each setting.

    .venv/bin/python benchmarks/engines.py --out bench-engines

Run it alone if you can: Ray runs its workers at niceness 15, so any other busy
process takes their CPU. Finished runs are kept in ``--out`` and not re-run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

LOCAL_STEPS = 4
# Per engine: the learning rate of its update rule (AdamW for backprop, SGD on the
# estimate for forward and zeroth) and its strategy. Zeroth uses fedkseed, so its
# downloads are the seed steps since a client's last round when that is smaller.
ENGINES: dict[str, list[str]] = {
    "backprop": ["client.engine='backprop'"],
    "forward": ["client.engine='forward'", "client.lr=1e-2"],
    "zeroth": ["client.engine='zeroth'", "client.lr=1e-3", "strategy.name='fedkseed'"],
}


def run(out: Path, name: str, settings: list[str]) -> tuple[dict, list[dict]]:
    folder = out / name
    if not (folder / "summary.json").exists():
        if folder.exists():
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "quickstart"]
        cmd += ["--out", str(folder), "--no-progress"]
        for item in settings:
            cmd += ["--set", item]
        started = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    from fedtune.metrics import read_events

    summary = json.loads((folder / "summary.json").read_text())
    updates = [u for u in read_events(folder / "metrics.jsonl", "client_update")]
    return summary, [u for u in updates if u["status"] == "ok"]


def step_seconds(updates: list[dict], steps: int, field: str = "cpu_seconds") -> float:
    """Seconds per local step of the fastest client-round: the one least disturbed by
    other processes (timeit's rule). With the cores shared, wall time stretches and CPU
    time too (torch's threads spin while they wait), so a median measures the load."""
    return min(u[field] for u in updates) / steps


def row(label: str, steps: int, summary: dict, updates: list[dict]) -> list[str]:
    return [
        label,
        str(steps),
        f"{statistics.mean(u['bytes_up'] for u in updates):,.0f}",
        f"{statistics.mean(u['bytes_down'] for u in updates):,.0f}",
        f"{max(u['peak_rss_mb'] for u in updates):,.0f}",
        f"{step_seconds(updates, steps, 'compute_seconds'):.2f}",
        f"{step_seconds(updates, steps):.2f}",
        f"{summary['final_perplexity']:.3f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-engines"))
    parser.add_argument(
        "--equal-time",
        nargs="*",
        default=[n for n in ENGINES if n != "backprop"],
        metavar="ENGINE",
        help="engines to run again at backprop's compute budget (default: all gradient-free)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    results = {name: run(args.out, name, settings) for name, settings in ENGINES.items()}
    reference = step_seconds(results["backprop"][1], LOCAL_STEPS) * LOCAL_STEPS
    for name, (summary, updates) in results.items():
        rows.append(row(f"{name}, equal steps", LOCAL_STEPS, summary, updates))
        if name not in args.equal_time:
            continue
        # As many local steps as fit in backprop's CPU time per client-round.
        steps = max(1, round(reference / step_seconds(updates, LOCAL_STEPS)))
        timed = [*ENGINES[name], f"client.local_steps={steps}"]
        summary_t, updates_t = run(args.out, f"{name}-equal-time", timed)
        rows.append(row(f"{name}, equal time", steps, summary_t, updates_t))

    initial = results["backprop"][0]["initial_perplexity"]
    print(f"Machine: {platform.machine()}, Python {platform.python_version()} — {date.today()}")
    print(f"Held-out perplexity before training: {initial:.3f}\n")
    columns = [
        "engine, budget",
        "local steps",
        "bytes up / client-round",
        "bytes down / client-round",
        "client peak RSS MiB",
        "wall s / step (fastest)",
        "CPU s / step (fastest)",
        "perplexity after 3 rounds",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
