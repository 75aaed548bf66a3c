"""Every built-in strategy on the same non-IID Shakespeare federation, clean and attacked.

Runs ``fedtune simulate`` once per (strategy, condition) with the same scenario and run
seed — the same sampled clients, batches and LoRA init — and prints a Markdown table
of held-out perplexity for ``benchmarks/RESULTS.md``. The attacked condition makes
``attack.fraction`` of the clients (a fixed set, the same for every strategy) reply
with their update sign-flipped and magnified (``attack.kind = "sign-flip"``).

    .venv/bin/python benchmarks/strategies.py --out bench-strategies [--quick]

Finished runs are kept in ``--out`` and not re-run, so an interrupted benchmark
resumes where it stopped. ``--quick`` runs the tiny model for a smoke test.
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

# The federation compared: SmolLM2-135M (bf16 compute), 60 Shakespeare roles as
# clients (one role's lines each: non-IID by construction), 5 sampled per round.
SCENARIO = [
    "model.compute_dtype='bf16'",
    "data.num_clients=60",
    "data.min_chars=10000",
    "data.eval_clients=8",
    "data.eval_chunks=32",
    "client.local_steps=2",
    "client.batch_size=4",
    "client.seq_len=64",
    "client.lr=3e-3",
    "round.clients_per_round=5",
    "round.min_reports=3",
    "run.rounds=2",
]
QUICK = [
    "model.name='tiny-llama'",
    "data.num_clients=60",
    "data.min_chars=4000",
    "data.eval_chunks=8",
    "client.seq_len=32",
    "client.local_steps=1",
    "round.clients_per_round=6",
    "round.min_reports=3",
    "run.rounds=2",
]
ATTACK = ["attack.fraction=0.2", "attack.kind='sign-flip'", "attack.scale=10.0"]
# Strategy settings: Flower's defaults except where a default does not suit a LoRA
# adapter (server Adam steps of 0.1 would swamp weights of ~1e-2) or where the rule
# needs to know how many bad replies to expect (5 per round, 20 % attackers).
PARAMS: dict[str, list[str]] = {
    "fedprox": ["strategy.proximal_mu=0.01"],
    "fedadam": ["strategy.eta=1e-3", "strategy.eta_l=1e-3"],
    "fedyogi": ["strategy.eta=1e-3", "strategy.eta_l=1e-3"],
    "fedavgm": ["strategy.server_momentum=0.5"],
    "trimmed-mean": ["strategy.beta=0.2"],
    "krum": ["strategy.num_malicious_nodes=1"],
}


SEED_STEP_RULES = {"fedkseed"}
"""Rules for the zeroth engine's seed steps: compared in benchmarks/engines.py."""


def builtins() -> list[str]:
    from fedtune.strategies.registry import BUILTINS

    return sorted(set(BUILTINS) - SEED_STEP_RULES)


def run(out: Path, name: str, attacked: bool, base: list[str]) -> dict:
    folder = out / f"{name}{'-attacked' if attacked else ''}"
    if (folder / "summary.json").exists():
        return json.loads((folder / "summary.json").read_text())
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    settings = [
        *base,
        f"strategy.name={name!r}",
        *PARAMS.get(name, []),
        *(ATTACK if attacked else []),
    ]
    cmd = [
        sys.executable,
        "-m",
        "fedtune.cli",
        "simulate",
        "quickstart",
        "--out",
        str(folder),
        "--no-progress",
    ]
    for item in settings:
        cmd += ["--set", item]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} (attacked={attacked}) failed:\n{result.stderr[-3000:]}")
    print(f"{folder.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads((folder / "summary.json").read_text())


def attackers_kept(folder: Path) -> int:
    from fedtune.metrics import read_events

    events = read_events(folder / "metrics.jsonl", "client_update")
    return sum(1 for e in events if e.get("attacker") and e["status"] == "ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-strategies"))
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds (smoke test)")
    parser.add_argument("--only", nargs="*", help="strategy names (default: every built-in)")
    args = parser.parse_args()
    base = QUICK if args.quick else SCENARIO
    names = args.only or builtins()
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for name in names:
        clean = run(args.out, name, False, base)
        attacked = run(args.out, name, True, base)
        rows.append((name, clean, attacked, attackers_kept(args.out / f"{name}-attacked")))

    initial = rows[0][1]["initial_perplexity"]
    print(f"Machine: {platform.machine()}, Python {platform.python_version()} — {date.today()}")
    print(f"Settings: {' '.join(base)}; attack: {' '.join(ATTACK)}\n")
    print(f"Held-out perplexity before training: {initial:.3f}\n")
    columns = [
        "strategy",
        "perplexity, clean",
        "÷ fedavg clean",
        "perplexity, 20 % sign-flip ×10",
        "÷ own clean",
        "attacker replies in the rounds",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    names_run = [n for n, _, _, _ in rows]
    reference = (
        rows[names_run.index("fedavg")][1]["final_perplexity"] if "fedavg" in names_run else 0
    )
    for name, clean, attacked, kept in rows:
        c, a = clean["final_perplexity"], attacked["final_perplexity"]
        cells = [
            name,
            f"{c:.3f}",
            f"{c / reference:.3f}" if reference else "—",
            f"{a:.3f}",
            f"{a / c:.2f}",
            str(kept),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
