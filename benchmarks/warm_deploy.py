"""Warm ClientApps on real SuperNodes against Flower's per-message ClientApp process.

One SuperLink and 3 SuperNodes on loopback, `fedtune serve SCENARIO` for 5 rounds with
every node sampled every round — once with the warm worker (`fedtune.clients.warm`, the
default) and once with `warm-worker=false` on every node (a new ClientApp process per
message, as Flower runs it: torch imported and the model loaded every round). Reports
per round the clients' reply time (server's send to reply, mean of the 3) and the round's
wall time, the ratio per-message / warm, and the model loads per node.

    .venv/bin/python benchmarks/warm_deploy.py [SCENARIO] [--rounds 5] [--flowertune]
        [--reverse] [--set k=v ...]
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
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NODES = 3


def run(mode: str, scenario: str, rounds: int, extra: list[str], folder: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))  # the tests' loopback deployment (SuperLink, SuperNodes)
    from fedtune.metrics import read_events
    from tests.integration.federation import Federation

    folder.mkdir(parents=True)
    federation = Federation(
        folder,
        list(range(NODES)),
        node_config=f"warm-worker={'true' if mode == 'warm' else 'false'}",
        env={"FEDTUNE_WORKER_DIR": str(folder / "workers")},
    )
    env = federation.env
    run_dir = folder / "run"
    overrides = [
        f"run.rounds={rounds}",
        f"round.clients_per_round={NODES}",
        f"round.min_reports={NODES}",
        "round.deadline_s=900",
        *extra,
    ]
    if mode == "flowertune":
        cmd = flowertune_run(scenario, overrides, run_dir, federation.address, folder, env)
    else:
        cmd = [sys.executable, "-m", "fedtune.cli", "serve", scenario, "--out", str(run_dir)]
        cmd += ["--superlink", federation.address, "--nodes", str(NODES)]
        cmd += [a for kv in overrides for a in ("--set", kv)]
    started = time.perf_counter()
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        federation.stop()
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{mode}: {' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    updates = list(read_events(run_dir / "metrics.jsonl", "client_update"))
    rounds_ev = [e for e in read_events(run_dir / "metrics.jsonl", "round") if e["round"] > 0]
    loads: dict[int, int] = defaultdict(int)
    for client in sorted({u["client"] for u in updates}):
        mine = [u for u in updates if u["client"] == client and u["status"] == "ok"]
        in_worker = [u["model_loads"] for u in mine if u.get("warm_worker") == 1]
        # Per-message processes load once each; a worker's count is cumulative.
        # The FlowerTune-style client reports none: it loads once per message.
        loads[client] = sum(
            u.get("model_loads", 1) for u in mine if u.get("warm_worker") != 1
        ) + max(in_worker, default=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "mode": mode,
        "wall": wall,
        "reply": [
            statistics.mean(u["reply_seconds"] for u in updates if u["round"] == r["round"])
            for r in rounds_ev
        ],
        "compute": [
            statistics.mean(u["compute_seconds"] for u in updates if u["round"] == r["round"])
            for r in rounds_ev
        ],
        "round_wall": [r["wall_seconds"] for r in rounds_ev],
        "participants": [r["participants"] for r in rounds_ev],
        "loads": dict(loads),
        "fallbacks": sum(1 for u in updates if u.get("warm_worker") == 0 and mode == "warm"),
        "perplexity": summary["final_perplexity"],
    }


def flowertune_run(
    scenario: str,
    overrides: list[str],
    run_dir: Path,
    superlink: str,
    folder: Path,
    env: dict[str, str],
) -> list[str]:
    """The ``flwr run`` command of an app whose ServerApp is fedtune's and whose ClientApp
    is the FlowerTune-style one (``benchmarks/flowertune_app.py``, shipped in the app:
    a new ClientApp process per message, as Flower runs any ClientApp)."""
    import shutil

    from fedtune.server.serve import APP_PYPROJECT, _flwr, write_flower_files

    app_dir, home = write_flower_files(folder / "flowertune-app", superlink, None)
    # Its ClientApp answers train messages only: no warm-up (`warm`) is sent to it.
    pyproject = APP_PYPROJECT.replace("fedtune.clients.warm:app", "flowertune_app:app")
    pyproject = pyproject.replace("warm = true", "warm = false")
    if "flowertune_app:app" not in pyproject or "warm = false" not in pyproject:
        raise SystemExit("fedtune serve's app pyproject changed: update flowertune_run")
    (app_dir / "pyproject.toml").write_text(pyproject)
    shutil.copy(Path(__file__).with_name("flowertune_app.py"), app_dir / "flowertune_app.py")
    env["FLWR_HOME"] = str(home)
    config = (
        f'scenario="{scenario}" overrides="{" ".join(overrides)}" out="{run_dir}" nodes={NODES}'
    )
    return [_flwr(), "run", str(app_dir), "fedtune", "--run-config", config, "--stream"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", default="quickstart")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--flowertune", action="store_true", help="also the FlowerTune-style app")
    parser.add_argument("--only", choices=["flowertune"], help="check one mode, no table")
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="run the modes last to first (FlowerTune-style, per-message, warm): a machine "
        "that drifts slower over the run then disadvantages warm fedtune instead",
    )
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (rounds 2+ are where a worker is warm)")
    folder = Path(tempfile.mkdtemp(prefix="fedtune-warm-"))
    if args.only:
        print(json.dumps(run(args.only, args.scenario, args.rounds, args.set, folder / args.only)))
        return
    modes = {"warm": "warm", "per-message": "cold"}
    if args.flowertune:
        modes["flowertune"] = "flowertune"
    order = list(reversed(modes)) if args.reverse else list(modes)
    runs = {m: run(m, args.scenario, args.rounds, args.set, folder / modes[m]) for m in order}
    warm, cold, tune = runs["warm"], runs["per-message"], runs.get("flowertune")
    print(f"Machine: {platform.machine()}, {platform.python_version()}, {time.strftime('%F')}")
    print(f"Modes in the order run: {', '.join(order)}")
    print(
        "| round | reply s, per-message | reply s, warm | ratio | round wall, per-message "
        "| round wall, warm | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, (c, w) in enumerate(zip(cold["reply"], warm["reply"], strict=True)):
        cw, ww = cold["round_wall"][i], warm["round_wall"][i]
        print(
            f"| {i + 1} | {c:.1f} | {w:.1f} | {c / w:.2f}x | {cw:.1f} | {ww:.1f} | {cw / ww:.2f}x |"
        )
    c, w = statistics.mean(cold["reply"]), statistics.mean(warm["reply"])
    c2, w2 = statistics.mean(cold["reply"][1:]), statistics.mean(warm["reply"][1:])
    print(f"| mean | {c:.1f} | {w:.1f} | {c / w:.2f}x | | | |")
    print(f"| mean, rounds 2+ | {c2:.1f} | {w2:.1f} | {c2 / w2:.2f}x | | | |")
    if tune is not None:
        t, w = statistics.mean(tune["reply"]), statistics.mean(warm["reply"])
        t2 = statistics.mean(tune["reply"][1:])
        print(
            f"FlowerTune-style per message: mean reply {t:.1f} s (rounds 2+: {t2:.1f} s); "
            f"ratio to warm fedtune {t / w:.2f}x (rounds 2+: {t2 / w2:.2f}x); round walls "
            f"{', '.join(f'{x:.1f}' for x in tune['round_wall'])}"
        )
    for r in (cold, warm, *([tune] if tune else [])):
        print(
            f"{r['mode']}: whole command {r['wall']:.1f} s, model loads per client {r['loads']}, "
            f"mean compute {statistics.mean(r['compute']):.1f} s, final perplexity "
            f"{r['perplexity']:.3f}, participants {r['participants']}"
            + (f", fallbacks {r['fallbacks']}" if r["mode"] == "warm" else "")
        )
    print(json.dumps([warm, cold, tune]))


if __name__ == "__main__":
    main()
