"""Population scaling: the same work (10 clients a round, 2 rounds of the tiny model) on
populations of 100, 1,000 and 10,000 virtual clients, one `fedtune simulate` each.

The population is a JSONL file of short texts (one client a line, written here, seeded);
the run is Flower's simulation engine (Ray) as `fedtune simulate` starts it. Reports
the whole command's wall time, the driver's peak RSS (the ServerApp's process) and the
rounds' wall times, with ratios to the smallest population.

    .venv/bin/python benchmarks/population.py [--sizes 100 1000 10000] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the king shall go to rome and love thee not my lord good night sweet prince".split()
HELD_OUT = 10


def write_population(path: Path, clients: int, seed: int = 0) -> None:
    """``clients`` training clients plus the held-out ones, ~120 words each."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(clients + HELD_OUT):
            text = " ".join(rng.choice(WORDS) for _ in range(120))
            f.write(json.dumps({"client_id": f"c{i:05d}", "text": text}) + "\n")


def run(size: int, folder: Path, extra: list[str]) -> dict[str, float]:
    data = folder / f"population-{size}.jsonl"
    write_population(data, size)
    out = folder / f"run-{size}"
    overrides = [
        "data.name=jsonl",
        f"data.path={data}",
        "data.min_chars=100",
        "data.num_clients=0",
        f"data.eval_clients={HELD_OUT}",
        "round.clients_per_round=10",
        "round.min_reports=1",
        "round.deadline_s=900",
        *extra,
    ]
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "tiny", "--out", str(out)]
    cmd += ["--no-progress", *[a for kv in overrides for a in ("--set", kv)]]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rounds = [
        e
        for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if e["event"] == "round" and e["round"] > 0
    ]
    return {
        "population": summary["population"],
        "wall": wall,
        "run_wall": summary["wall_seconds"],
        "rss": summary["server_peak_rss_mb"],
        "rounds": [r["wall_seconds"] for r in rounds],
        "participants": [r["participants"] for r in rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fedtune-population-"))
    results = [run(size, folder, args.set) for size in args.sizes]
    base = results[0]
    print(f"Machine: {platform.machine()}, {platform.python_version()}, {time.strftime('%F')}")
    print(
        "| population | command wall | ratio | run wall (summary) | driver peak RSS | ratio "
        "| round walls | participants |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['population']:,} | {r['wall']:.1f} s | {r['wall'] / base['wall']:.2f}x "
            f"| {r['run_wall']:.1f} s | {r['rss']:.0f} MiB | {r['rss'] / base['rss']:.3f}x "
            f"| {', '.join(f'{w:.1f}' for w in r['rounds'])} s "
            f"| {', '.join(map(str, r['participants']))} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
