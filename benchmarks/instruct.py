"""LoRA strategies on the instruction federation: IID vs Dirichlet(0.1), same seeds.

Runs ``fedtune simulate instruct`` (SmolLM2-135M-Instruct, chatterbot's English Q->A
pairs, the loss on the answers) once per (strategy, split): the same held-out rows
(``data.eval_fraction``), the same run seed, the same number of training clients.
Prints a Markdown table for ``benchmarks/RESULTS.md``: global held-out perplexity of
the answers, ROUGE-L and exact match of greedy answers, and per-client perplexity
(mean, worst decile) on the clients' own held-out answers, before training (round 0)
and after the last round.

    .venv/bin/python benchmarks/instruct.py --out bench-instruct [--quick]

Finished runs are kept in ``--out`` and not re-run. ``--quick`` runs the tiny model.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

SPLITS = {
    "iid": ["data.partitioner='iid'", "data.num_clients=12"],
    "dirichlet-0.1": ["data.partitioner='dirichlet'", "data.alpha=0.1", "data.num_clients=12"],
}
STRATEGIES = ["fedavg", "ffa-lora", "fedsa-lora"]
# Sized for 2 busy cores (~10 min a run): fewer rounds, clients, scored clients and
# answers than the shipped scenario; every run has the same settings.
SCENARIO = [
    "run.rounds=2",
    "client.local_steps=4",
    "round.clients_per_round=3",
    "round.min_reports=2",
    "data.eval_chunks=24",
    "data.local_holdout=0.1",
    "evaluation.clients=4",
    "evaluation.examples=16",
    "evaluation.max_new_tokens=32",
]
QUICK = [
    "model.name='tiny-llama'",
    "lora.r=4",
    "lora.alpha=8",
    "run.rounds=2",
    "client.local_steps=2",
    "client.batch_size=4",
    "data.eval_chunks=8",
    "evaluation.examples=4",
    "evaluation.max_new_tokens=4",
]


def run(out: Path, strategy: str, split: str, base: list[str]) -> Path:
    """One run's folder (run now unless it finished before)."""
    folder = out / f"{strategy}-{split}"
    if (folder / "summary.json").exists():
        return folder
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "instruct", "--out", str(folder)]
    cmd.append("--no-progress")
    for item in [*base, *SPLITS[split], f"strategy.name={strategy!r}"]:
        cmd += ["--set", item]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{strategy} on {split} failed:\n{result.stderr[-3000:]}")
    print(f"{folder.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return folder


def rounds(folder: Path) -> list[dict]:
    from fedtune.metrics import read_events

    return [r for r in read_events(folder / "metrics.jsonl", "round") if "rouge_l" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-instruct"))
    parser.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--only", nargs="*", help="strategy names (default: all three)")
    args = parser.parse_args()
    base = QUICK if args.quick else SCENARIO
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"Machine: {platform.machine()}, Python {platform.python_version()} — {date.today()}")
    print(f"Settings: instruct.toml with {' '.join(base)}\n")
    columns = [
        "strategy",
        "split",
        "perplexity",
        "ROUGE-L",
        "exact match",
        "client ppl mean",
        "client ppl worst decile",
        "wall s",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for strategy in args.only or STRATEGIES:
        for split in SPLITS:
            folder = run(args.out, strategy, split, base)
            events = rounds(folder)
            summary = json.loads((folder / "summary.json").read_text())
            first, last = events[0], events[-1]

            def pair(key: str, digits: int, a: dict = first, b: dict = last) -> str:
                return f"{a[key]:.{digits}f} -> {b[key]:.{digits}f}"

            cells = [
                strategy,
                split,
                pair("perplexity", 2),
                pair("rouge_l", 3),
                pair("exact_match", 3),
                pair("client_perplexity_mean", 2),
                pair("client_perplexity_worst_decile", 2),
                f"{summary['wall_seconds']:.0f}",
            ]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
