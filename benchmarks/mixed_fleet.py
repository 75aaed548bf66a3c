"""A mixed fleet: phones too small for backprop probe (FwdLLM) instead of sitting out.

The shipped ``phones`` scenario (120 Shakespeare clients over five device tiers, HetLoRA,
low-end phones at rank 4) on SmolLM2-135M-Instruct, 8 clients sampled a round with no
over-selection (so every sampled client that reports counts), the same run seeds in
every setting (the same sampled clients, availability, dropouts, batches, LoRA init).
A phone's memory need is fixed at the device client's figures when this benchmark was
written (``devices.backprop_mb = 1857``: int8 training artifacts, issue 14's second
pass; ``devices.inference_mb = 358``: the int4 inference graph), so the low-phone tier
(1,200 MB) cannot train by backprop and every other tier can. They are kept so that the
fleet still has phones too small for backprop: today's artifacts train in 637 MiB
(``fedtune/ondevice/footprints.json``), which every tier of ``phones`` has.

Settings:

- ``dropped``: ``client.engine = "backprop"``; low phones are sent no work ("does not
  fit").
- ``zeroth``: ``client.engine = "auto"``, ``client.auto_fallback = "zeroth"``: low phones
  take local MeZO steps.
- ``forward``: ``client.engine = "auto"``, ``client.auto_fallback = "forward"``: low
  phones send ``client.perturbations`` FwdLLM probes at the adapter they were sent,
  replayed by the server as one SGD step.

Each setting runs :func:`fedtune.server.loop.run_federation` in this process on an
:class:`~fedtune.server.inprocess.InProcessGrid` (real ClientApps, one after another).
Prints a Markdown table for ``benchmarks/RESULTS.md`` and writes ``mixed_fleet.png``
into ``--out``; finished settings are kept there and not re-run.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/mixed_fleet.py --out /tmp/bench-mixed
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

COMMON = [
    "model.name='smollm2-135m'",
    "round.over_selection=0",
    "round.min_reports=2",
    "round.deadline_s=3600",
    "devices.backprop_mb=1857",
    "devices.inference_mb=358",
    "client.forward_derivative='fd'",
]
SETTINGS: dict[str, list[str]] = {
    "dropped": ["client.engine='backprop'"],
    "zeroth": ["client.engine='auto'", "client.auto_fallback='zeroth'"],
    "forward": ["client.engine='auto'", "client.auto_fallback='forward'"],
}


def run(out: Path, name: str, seed: int, rounds: int) -> Path:
    """Run setting ``name`` with ``seed`` unless its folder holds a finished run."""
    from fedtune.config import load_scenario
    from fedtune.server.inprocess import InProcessGrid, task_identity
    from fedtune.server.loop import run_federation

    folder = out / f"{name}-seed{seed}"
    if (folder / "summary.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    scenario = load_scenario(
        "phones", [*COMMON, *SETTINGS[name], f"run.seed={seed}", f"run.rounds={rounds}"]
    )
    started = time.perf_counter()
    with task_identity():
        grid = InProcessGrid({1000 + i: i for i in range(scenario.data.num_clients)})
        run_federation(grid, scenario, folder)
    print(f"{folder.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return folder


def summarize(folder: Path) -> dict:
    from fedtune.metrics import read_events

    rounds = list(read_events(folder / "metrics.jsonl", "round"))
    updates = list(read_events(folder / "metrics.jsonl", "client_update"))
    low = [u for u in updates if u["tier"] == "low-phone"]
    kept = [u for u in updates if u["status"] == "ok"]
    return {
        "curve": [r["perplexity"] for r in rounds],
        "reports": len(kept),
        "low_ok": sum(u["status"] == "ok" for u in low),
        "low_sampled": len(low),
        "low_bytes_up": statistics.fmean([u["bytes_up"] for u in low if u["status"] == "ok"])
        if any(u["status"] == "ok" for u in low)
        else 0.0,
        "rejected": sum(u["status"] == "rejected" for u in updates),
    }


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, delta) = plt.subplots(1, 2, figsize=(11, 4))
    means = {
        name: [statistics.fmean(v) for v in zip(*(r["curve"] for r in runs), strict=True)]
        for name, runs in results.items()
    }
    for name, mean in means.items():
        n = len(results[name])
        ax.plot(range(len(mean)), mean, marker="o", label=f"{name} (mean of {n} seeds)")
        if "dropped" in means:
            diff = [m - d for m, d in zip(mean, means["dropped"], strict=True)]
            delta.plot(range(len(diff)), diff, marker="o", label=name)
    ax.set(xlabel="round", ylabel="held-out perplexity")
    delta.set(xlabel="round", ylabel="perplexity minus dropped's (lower is better)")
    ax.legend()
    delta.legend()
    fig.suptitle("phones fleet, SmolLM2-135M: low phones dropped, zeroth or probing")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for seed in range(args.seeds):  # seed-major: every setting has its first seed early
        for name in args.only:
            folder = run(args.out, name, seed, args.rounds)
            results.setdefault(name, []).append(summarize(folder))
    plot(results, args.out / "mixed_fleet.png")
    print(f"Machine: {platform.machine()}, Python {platform.python_version()} — {date.today()}")
    print()
    print(
        "| setting | perplexity: start -> end, per seed | mean end | accepted reports | "
        "low phones: ok / sampled | low phone bytes up | rejected |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        ends = ", ".join(f"{r['curve'][0]:.2f} -> {r['curve'][-1]:.2f}" for r in runs)
        mean_end = statistics.fmean(r["curve"][-1] for r in runs)
        print(
            f"| {name} | {ends} | {mean_end:.3f} | {sum(r['reports'] for r in runs)} | "
            f"{sum(r['low_ok'] for r in runs)} / {sum(r['low_sampled'] for r in runs)} | "
            f"{statistics.fmean(r['low_bytes_up'] for r in runs):,.0f} | "
            f"{sum(r['rejected'] for r in runs)} |"
        )
    if "dropped" in results:
        base = statistics.fmean(r["curve"][-1] for r in results["dropped"])
        for name in results:
            if name != "dropped":
                end = statistics.fmean(r["curve"][-1] for r in results[name])
                print(f"{name} vs dropped: final perplexity {end - base:+.3f}")
    (args.out / "rows.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
