"""fedtune's ClientApp against a FlowerTune-style one (benchmarks/flowertune_app.py) on
the same work, in simulation: the same server loop, scenario, clients, batches and steps.

Each side runs in its own process as an in-process federation (fedtune's round loop with
each client's ClientApp called in the driver, no Ray: `simulate_in_process`'s grid), so
both pay the same server, one process, the same 2 cores; what differs is the client:
fedtune keeps the model loaded across clients and rounds, the FlowerTune-style client
reloads model and tokenizer and builds a Trainer each client-round.

    .venv/bin/python benchmarks/flowertune.py [SCENARIO] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def side(which: str, scenario_name: str, overrides: list[str], out: Path) -> None:
    """One side's run, in this process; prints its figures as JSON."""
    sys.path.insert(0, str(HERE))
    from fedtune.config import load_scenario
    from fedtune.data import build_population
    from fedtune.metrics import read_events
    from fedtune.server.inprocess import InProcessGrid, task_identity
    from fedtune.server.loop import run_federation

    scenario = load_scenario(scenario_name, overrides)
    if which == "flowertune":
        from flowertune_app import app
    else:
        from fedtune.clients.app import app
    nodes = {1000 + i: i for i in range(len(build_population(scenario.data).train))}
    started = time.perf_counter()
    with task_identity():
        grid = InProcessGrid(nodes, app=app)
        summary = run_federation(grid, scenario, out, expected_nodes=len(nodes), known_nodes=nodes)
    wall = time.perf_counter() - started
    rounds = [r for r in read_events(out / "metrics.jsonl", "round") if r["round"] > 0]
    print(
        json.dumps(
            {
                "side": which,
                "wall": wall,
                "rounds": [r["wall_seconds"] for r in rounds],
                "initial": summary["initial_perplexity"],
                "final": summary["final_perplexity"],
                "participants": [r["participants"] for r in rounds],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", default="quickstart")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--side", choices=["fedtune", "flowertune"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.side:
        side(args.side, args.scenario, args.set, args.out)
        return
    from fedtune.config import load_scenario
    from fedtune.models.base import TINY, model_dir

    scenario = load_scenario(args.scenario, args.set)
    if scenario.model.name not in TINY:
        model_dir(scenario.model.name)  # the one-time conversion counts for neither side
    folder = Path(tempfile.mkdtemp(prefix="fedtune-flowertune-"))
    results = {}
    for which in ("fedtune", "flowertune"):
        cmd = [sys.executable, __file__, args.scenario, "--side", which]
        cmd += ["--out", str(folder / which), *[a for kv in args.set for a in ("--set", kv)]]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{which} failed:\n{done.stderr[-3000:]}")
        results[which] = json.loads(done.stdout.strip().splitlines()[-1])
        results[which]["command"] = time.perf_counter() - started
    f, t = results["fedtune"], results["flowertune"]
    print(f"Machine: {platform.machine()}, {platform.python_version()}, {time.strftime('%F')}")
    print("| quantity | fedtune | FlowerTune-style | ratio fedtune / FlowerTune |")
    print("|---|---|---|---|")
    print(
        f"| whole command | {f['command']:.1f} s | {t['command']:.1f} s "
        f"| {f['command'] / t['command']:.2f}x |"
    )
    f_run, t_run = f["wall"], t["wall"]
    print(f"| run (server loop) | {f_run:.1f} s | {t_run:.1f} s | {f_run / t_run:.2f}x |")
    fr, tr = statistics.mean(f["rounds"]), statistics.mean(t["rounds"])
    print(f"| mean round wall | {fr:.1f} s | {tr:.1f} s | {fr / tr:.2f}x |")
    print(
        f"| perplexity before -> after | {f['initial']:.3f} -> {f['final']:.3f} "
        f"| {t['initial']:.3f} -> {t['final']:.3f} | {f['final'] / t['final']:.4f} |"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
