"""Privacy's price: held-out perplexity against ε, and secure aggregation's cost per round.

Utility: ``fedtune simulate`` on Shakespeare with 120 clients (one speaking role each),
10 sampled per round, for FedAvg-LoRA and FFA-LoRA, without DP and with central DP at
ε = 8, 4, 1 (δ = 1e-4) after the run's rounds. For each ε the noise multiplier is the
smallest that the run's own accountant (fixed-size sampling without replacement,
dp-accounting's RDP) reports at or below that ε; the clipping bound is the median L2
norm of a first-round update, measured on a few clients before the runs.

Cost: the same federation (FedAvg, no DP) with ``privacy.secure_aggregation = true``,
every client paired with every other (SecAgg) and with 4 neighbours (SecAgg+), against
the plain run: wall time per round, the protocol's own seconds and bytes per round.

    .venv/bin/python benchmarks/privacy.py --out bench-privacy [--quick]

Finished runs are kept in ``--out`` and not re-run. ``--quick`` uses tiny-llama and 2
rounds: a smoke test, not a result.
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

DELTA = 1e-4
EPSILONS = (8.0, 4.0, 1.0)
STRATEGIES = ("fedavg", "ffa-lora")
SCENARIO = [
    "model.compute_dtype='bf16'",
    "data.num_clients=120",
    "data.min_chars=10000",
    "data.eval_clients=8",
    "data.eval_chunks=32",
    "client.local_steps=1",
    "client.batch_size=4",
    "client.seq_len=64",
    "client.lr=3e-3",
    "round.clients_per_round=10",
    "round.min_reports=5",
    "run.rounds=3",
]
QUICK = [
    "model.name='tiny-llama'",
    "data.num_clients=120",
    "data.min_chars=4000",
    "data.eval_chunks=8",
    "client.seq_len=32",
    "client.local_steps=1",
    "round.clients_per_round=10",
    "round.min_reports=5",
    "run.rounds=2",
]


def setting(base: list[str], key: str) -> str:
    from fedtune.config import load_scenario

    section, name = key.split(".")
    return getattr(getattr(load_scenario("quickstart", base), section), name)


def noise_for(epsilon: float, population: int, sample: int, rounds: int) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ε after ``rounds`` is <= ``epsilon``."""
    from fedtune.privacy.accounting import central_epsilon

    low, high = 0.3, 100.0
    while high / low > 1.001:
        middle = (low * high) ** 0.5
        if central_epsilon(middle, DELTA, ((population, sample, rounds),)) > epsilon:
            low = middle
        else:
            high = middle
    return high


def median_update_norm(base: list[str], train_only: str, clients: int = 6) -> float:
    """Median L2 norm of the update of the first ``clients`` clients in round 1."""
    from fedtune.config import load_scenario
    from fedtune.data import build_population, client_train_chunks
    from fedtune.engines import engine_settings, get_engine
    from fedtune.models import (
        adapter_state,
        attach_lora,
        load_adapter_state,
        load_base_model,
        load_tokenizer,
    )
    from fedtune.privacy.clipping import difference, l2_norm

    scenario = load_scenario("quickstart", base)
    m = scenario.model
    model = attach_lora(
        load_base_model(m.name, m.compute_dtype, m.num_layers, m.quantization),
        scenario.lora,
        seed=scenario.run.seed,
    )
    start = adapter_state(model)
    tokenizer = load_tokenizer(m.name)
    population = build_population(scenario.data)
    engine = get_engine(scenario.client.engine)
    norms = []
    for index in range(clients):
        load_adapter_state(model, start)
        chunks = client_train_chunks(
            tokenizer, population.train[index], scenario.data, scenario.client.seq_len
        )
        config = engine_settings(
            scenario.client.engine, scenario, seed=index, train_only=train_only
        )
        trained = engine.train(model, chunks, config).state
        norms.append(l2_norm(difference(trained, start, start.keys())))
    return statistics.median(norms)


def run(out: Path, name: str, settings: list[str]) -> Path:
    folder = out / name
    if (folder / "summary.json").exists():
        return folder
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
    return folder


def rounds_of(folder: Path) -> list[dict]:
    from fedtune.metrics import read_events

    return [e for e in read_events(folder / "metrics.jsonl", "round") if e["round"] > 0]


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def utility(out: Path, base: list[str]) -> None:
    population = int(setting(base, "data.num_clients"))
    sample = int(setting(base, "round.clients_per_round"))
    rounds = int(setting(base, "run.rounds"))
    print(f"Held-out perplexity after {rounds} rounds; δ = {DELTA}.\n")
    columns = [
        "strategy",
        "ε",
        "noise multiplier σ",
        "clip C (median norm)",
        "noise std per value of the mean, σC/m",
        "perplexity",
        "÷ no DP",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for strategy in STRATEGIES:
        plain = summary_of(run(out, f"{strategy}-nodp", [*base, f"strategy.name={strategy!r}"]))
        print(f"| {strategy} | ∞ (no DP) | — | — | — | {plain['final_perplexity']:.2f} | 1.000 |")
        bound = median_update_norm(base, "B" if strategy == "ffa-lora" else "all")
        for epsilon in EPSILONS:
            sigma = noise_for(epsilon, population, sample, rounds)
            settings = [
                *base,
                f"strategy.name={strategy!r}",
                "privacy.mode='central'",
                f"privacy.noise_multiplier={sigma}",
                f"privacy.clip={bound}",
                f"privacy.target_delta={DELTA}",
            ]
            summary = summary_of(run(out, f"{strategy}-eps{epsilon:g}", settings))
            spent = summary["privacy"]["epsilon"]
            ppl = summary["final_perplexity"]
            noise = sigma * bound / sample
            print(
                f"| {strategy} | {spent:.2f} | {sigma:.3f} | {bound:.4f} | {noise:.4f} "
                f"| {ppl:.5g} | {ppl / plain['final_perplexity']:.4g} |"
            )
    print(f"\nInitial perplexity: {plain['initial_perplexity']:.2f}")


def secure_cost(out: Path, base: list[str]) -> None:
    plain = run(out, "fedavg-nodp", [*base, "strategy.name='fedavg'"])
    clip = median_update_norm(base, "all") * 4  # no DP: a bound that rarely bites
    variants = [("no secure aggregation", plain)]
    for label, neighbours in (("SecAgg (all pairs)", 0), ("SecAgg+ (4 neighbours)", 4)):
        settings = [
            *base,
            "strategy.name='fedavg'",
            "privacy.secure_aggregation=true",
            f"privacy.secagg_neighbours={neighbours}",
            f"privacy.clip={clip}",
        ]
        variants.append((label, run(out, f"fedavg-secagg-k{neighbours}", settings)))
    sample = int(setting(base, "round.clients_per_round"))
    print(f"\n{sample} clients per round; means over rounds (the first round included).\n")
    columns = [
        "variant",
        "wall s / round",
        "protocol s / round",
        "protocol bytes / round",
        "bytes up / client",
        "bytes down / client",
        "perplexity",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for label, folder in variants:
        rounds = rounds_of(folder)
        mean = statistics.mean
        cells = [
            label,
            f"{mean(r['wall_seconds'] for r in rounds):.1f}",
            f"{mean(r.get('secagg_seconds', 0.0) for r in rounds):.2f}",
            f"{mean(r.get('secagg_bytes', 0) for r in rounds):,.0f}",
            f"{mean(r['bytes_up'] / r['participants'] for r in rounds):,.0f}",
            f"{mean(r['bytes_down'] / r['sampled'] for r in rounds):,.0f}",
            f"{summary_of(folder)['final_perplexity']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-privacy"))
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds (smoke test)")
    args = parser.parse_args()
    base = QUICK if args.quick else SCENARIO
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"Machine: {platform.machine()}, Python {platform.python_version()} — {date.today()}")
    print(f"Settings: {' '.join(base)}\n")
    utility(args.out, base)
    secure_cost(args.out, base)


if __name__ == "__main__":
    main()
