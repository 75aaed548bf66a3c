"""FwdLLM against the other ways to fine-tune on devices, per forward pass, same seeds.

SmolLM2-135M-Instruct fp32, LoRA r=8 on q,v, 120 Shakespeare clients, 4 sampled a
round, batches of 2x128 tokens, the same run seed (so the same sampled clients,
batches and LoRA init). Each setting runs :func:`fedtune.server.loop.run_federation`
in this process on an :class:`~fedtune.server.inprocess.InProcessGrid` (real
ClientApps, one after another: no Ray workers competing for the two cores).

Settings (every gradient-free one with two-point differences, ``fd``: two plain
inferences a direction, what a phone's inference graph can do):

- ``backprop``: FedAvg, 2 local AdamW steps a client-round.
- ``fwdllm``: 4 probes a client at the global adapter, pacing (more clients while the
  pooled variance is high, at most 6 a round) and discriminative sampling.
- ``fwdllm-uniform``: the same without pacing or discriminative sampling.
- ``fwdllm-B``: ``fwdllm`` probing LoRA B alone (FFA-LoRA's space: fewer dimensions).
- ``forward``: today's local forward engine under FedAvg, 1 local step of 4 directions.
- ``zeroth``: MeZO steps under ``fedkseed``, 4 local steps.

A device forward pass is one inference of a 2x128 batch (a backprop step counts its
forward pass; its backward pass costs about as much again). Prints a Markdown table
for ``benchmarks/RESULTS.md`` and writes ``fwdllm.png`` (perplexity against rounds and
against device forward passes) into ``--out``.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/fwdllm.py --out /tmp/bench-fwdllm

(``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads that spin while another process holds
the cores slowed a forward pass ninefold on the 2-core machine.) Finished settings are
kept in ``--out`` and not re-run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

COMMON = [
    "data.num_clients=120",
    "data.min_chars=5000",
    "round.clients_per_round=4",
    "round.min_reports=2",
    "round.deadline_s=3600",
    "client.forward_derivative='fd'",
    "client.batch_size=2",
]
FWDLLM = [
    "client.engine='forward'",
    "strategy.name='fwdllm'",
    "strategy.probes=4",
    "client.lr=3e-2",
]
SETTINGS: dict[str, list[str]] = {
    "backprop": ["client.local_steps=2", "run.rounds=4"],
    "fwdllm": [
        *FWDLLM,
        "strategy.variance_threshold=1e-6",
        "strategy.max_clients=6",
        "strategy.guide_sigmas=1.0",
        "run.rounds=5",
    ],
    "fwdllm-uniform": [*FWDLLM, "strategy.guide_sigmas=0.0", "run.rounds=5"],
    "fwdllm-B": [
        *FWDLLM,
        "strategy.trains='B'",
        "strategy.variance_threshold=1e-6",
        "strategy.max_clients=6",
        "strategy.guide_sigmas=1.0",
        "run.rounds=5",
    ],
    "forward": [
        "client.engine='forward'",
        "client.lr=1e-2",
        "client.local_steps=1",
        "client.perturbations=4",
        "client.max_perturbations=4",
        "run.rounds=5",
    ],
    "zeroth": [
        "client.engine='zeroth'",
        "strategy.name='fedkseed'",
        "client.lr=1e-3",
        "client.local_steps=4",
        "run.rounds=5",
    ],
}


def run(out: Path, name: str) -> Path:
    """Run setting ``name`` unless its folder holds a finished run."""
    from fedtune.config import load_scenario
    from fedtune.server.inprocess import InProcessGrid, task_identity
    from fedtune.server.loop import run_federation

    folder = out / name
    if (folder / "summary.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    scenario = load_scenario("quickstart", [*COMMON, *SETTINGS[name]])
    started = time.perf_counter()
    with task_identity():
        grid = InProcessGrid({1000 + i: i for i in range(scenario.data.num_clients)})
        run_federation(grid, scenario, folder)
    print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return folder


def passes_of(name: str, scenario_toml: str, rnd: dict, updates: list[dict]) -> int:
    """Device forward passes of one round (accepted clients' work)."""
    kept = [u for u in updates if u["status"] == "ok"]
    metrics = rnd.get("strategy_metrics", {})
    if name.startswith("fwdllm"):
        return 2 * int(metrics.get("fwdllm-probes", 0))
    steps = {"backprop": 2, "forward": 1, "zeroth": 4}[name]
    per_step = {"backprop": 1, "forward": 2 * 4, "zeroth": 2}[name]
    return len(kept) * steps * per_step


def summarize(out: Path, name: str) -> dict:
    from fedtune.metrics import read_events

    folder = out / name
    rounds = [e for e in read_events(folder / "metrics.jsonl", "round")]
    updates = list(read_events(folder / "metrics.jsonl", "client_update"))
    toml = (folder / "scenario.toml").read_text()
    curve = [(0, 0, rounds[0]["perplexity"])]
    total = 0
    for r in rounds[1:]:
        total += passes_of(name, toml, r, [u for u in updates if u["round"] == r["round"]])
        curve.append((r["round"], total, r["perplexity"]))
    kept = [u for u in updates if u["status"] == "ok"]
    return {
        "name": name,
        "curve": curve,
        "passes": total,
        "gain": curve[0][2] - curve[-1][2],
        "bytes_up": sum(u["bytes_up"] for u in kept) / max(len(kept), 1),
        "bytes_down": sum(u["bytes_down"] for u in kept) / max(len(kept), 1),
        "clients": len(kept),
        "cpu_seconds": sum(u.get("cpu_seconds") or 0.0 for u in kept),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_pass) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        rounds, passes, ppl = zip(*row["curve"], strict=True)
        by_round.plot(rounds, ppl, marker="o", label=row["name"])
        if row["name"] != "backprop":  # its 30-point drop would flatten the rest
            by_pass.plot(passes, ppl, marker="o", label=row["name"])
    by_round.set(xlabel="round", ylabel="held-out perplexity")
    by_pass.set(
        xlabel="device forward passes (2x128 tokens)",
        ylabel="held-out perplexity",
        title="gradient-free settings",
    )
    by_round.legend()
    by_pass.legend()
    fig.suptitle("SmolLM2-135M, 120 Shakespeare clients, 4 a round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only:
        run(args.out, name)
        rows.append(summarize(args.out, name))
    plot(rows, args.out / "fwdllm.png")
    print(f"Machine: {platform.machine()}, Python {platform.python_version()} — {date.today()}")
    print()
    print(
        "| setting | rounds | clients | device forward passes | bytes up / client-round | "
        "bytes down / client-round | client CPU s | perplexity: start -> end | "
        "gain per 1k passes |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        per_k = 1000 * row["gain"] / row["passes"] if row["passes"] else float("nan")
        row["per_k"] = per_k
        print(
            f"| {row['name']} | {len(row['curve']) - 1} | {row['clients']} | {row['passes']:,} | "
            f"{row['bytes_up']:,.0f} | {row['bytes_down']:,.0f} | {row['cpu_seconds']:,.0f} | "
            f"{row['curve'][0][2]:.3f} -> {row['curve'][-1][2]:.3f} | {per_k:.3f} |"
        )
    by_name = {row["name"]: row for row in rows}
    for name in ("fwdllm", "fwdllm-uniform", "fwdllm-B"):
        for other in ("forward", "zeroth"):
            if name in by_name and other in by_name and by_name[other]["per_k"] > 0:
                ratio = by_name[name]["per_k"] / by_name[other]["per_k"]
                print(f"{name} / {other}: {ratio:.2f}x perplexity gain per forward pass")
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
