"""Quantized frozen bases on SmolLM2-135M: client memory, step time, bytes, perplexity.

For each ``model.quantization`` × ``model.compute_dtype`` combination, in a fresh
subprocess (so peak RSS is that combination's own): load and quantize the base, attach
LoRA r=8 on q,v, run backprop steps of 4×128 tokens of a real Shakespeare client through
the backprop engine, and report peak RSS, resident memory after loading, the fastest
step time, and the protobuf size of the trained adapter per ``client.wire_dtype``.
Then ``fedtune simulate quickstart`` with the same two settings gives the held-out
perplexity. Prints a Markdown table for ``benchmarks/RESULTS.md``, with ratios to
none/fp32.

    .venv/bin/python benchmarks/quantization.py            # 8 quickstart runs: ~20 min idle
    .venv/bin/python benchmarks/quantization.py --quick    # 2 layers, 1 round: a smoke run
    .venv/bin/python benchmarks/quantization.py --clients-only  # the client columns alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUANTIZATIONS = ("none", "int8", "nf4", "int4")
COMPUTE_DTYPES = ("fp32", "bf16")
WIRE_DTYPES = ("fp32", "fp16", "int8")
QUICK = [
    "model.num_layers=2",
    "run.rounds=1",
    "data.num_clients=4",
    "data.eval_chunks=4",
    "round.clients_per_round=2",
    "round.min_reports=1",
    "client.local_steps=1",
]
"""Overrides of ``--quick``: SmolLM2's first 2 layers (real weights), one short round."""


def resident_mb() -> float:
    """Resident memory of this process now, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_client(overrides: list[str], steps: int) -> dict[str, Any]:
    """One client's cost under ``overrides`` (run in a fresh process)."""
    from flwr.app import RecordDict

    from fedtune.config import load_scenario
    from fedtune.data import build_population, client_train_chunks
    from fedtune.engines import engine_settings, get_engine
    from fedtune.metrics import peak_rss_mb
    from fedtune.models import attach_lora, load_base_model, load_tokenizer
    from fedtune.wire import encode_update, recorddict_nbytes

    s = load_scenario("quickstart", overrides)
    chunks = client_train_chunks(
        load_tokenizer(s.model.name), build_population(s.data).train[0], s.data, s.client.seq_len
    )
    base = load_base_model(
        s.model.name, s.model.compute_dtype, s.model.num_layers, s.model.quantization
    )
    model = attach_lora(base, s.lora, seed=s.run.seed)
    loaded_mb = resident_mb()
    engine = get_engine(s.client.engine)
    seconds, cpu_seconds = [], []
    for step in range(steps):
        one_step = load_scenario("quickstart", [*overrides, "client.local_steps=1"])
        config = engine_settings(s.client.engine, one_step, seed=step)
        started, cpu = time.perf_counter(), time.process_time()
        update = engine.train(model, chunks, config)
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu)
    return {
        "peak_rss_mb": peak_rss_mb(),
        "loaded_rss_mb": loaded_mb,
        # The fastest step: the least disturbed by other processes (timeit's rule).
        "step_seconds": min(seconds),
        "step_cpu_seconds": min(cpu_seconds),
        "loss": update.loss,
        "bytes": {
            wire: recorddict_nbytes(RecordDict({"arrays": encode_update(update.state, wire)}))
            for wire in WIRE_DTYPES
        },
    }


def run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def measure(
    quantization: str, dtype: str, extra: list[str], steps: int, simulate_too: bool = True
) -> dict[str, Any]:
    """Client cost in a fresh process, then (``simulate_too``) a real ``fedtune simulate``."""
    overrides = [f"model.quantization={quantization}", f"model.compute_dtype={dtype}", *extra]
    client = run([sys.executable, __file__, "--client", *overrides, "--steps", str(steps)])
    if not simulate_too:
        return json.loads(client.strip().splitlines()[-1])
    out = Path(tempfile.mkdtemp(prefix="fedtune-quant-")) / "run"
    sets = [a for kv in overrides for a in ("--set", kv)]
    simulate = [sys.executable, "-m", "fedtune.cli", "simulate", "quickstart", "--out", str(out)]
    run([*simulate, "--no-progress", *sets])
    summary = json.loads((out / "summary.json").read_text())
    return {**json.loads(client.strip().splitlines()[-1]), **summary}


def table(rows: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    ref = rows[("none", "fp32")]
    if "final_perplexity" not in ref:
        return client_table(rows)
    lines = [
        "| quantization | compute | client peak RSS MiB | ÷ | RSS after load MiB | ÷ "
        "| step s (fastest) | ÷ | step CPU s | ÷ | adapter B fp32 / fp16 / int8 "
        "| perplexity before → after | ÷ after | simulate s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (quantization, dtype), r in rows.items():
        sizes = " / ".join(f"{r['bytes'][w]:,}" for w in WIRE_DTYPES)
        lines.append(
            f"| {quantization} | {dtype} "
            f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f} "
            f"| {r['loaded_rss_mb']:.0f} | {r['loaded_rss_mb'] / ref['loaded_rss_mb']:.2f} "
            f"| {r['step_seconds']:.2f} | {r['step_seconds'] / ref['step_seconds']:.2f} "
            f"| {r['step_cpu_seconds']:.2f} "
            f"| {r['step_cpu_seconds'] / ref['step_cpu_seconds']:.2f} "
            f"| {sizes} "
            f"| {r['initial_perplexity']:.2f} → {r['final_perplexity']:.2f} "
            f"| {r['final_perplexity'] / ref['final_perplexity']:.3f} "
            f"| {r['wall_seconds']:.0f} |"
        )
    return lines


def client_table(rows: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """The client columns only (``--clients-only``), with ratios to none/fp32 and to none
    at the same compute dtype."""
    ref = rows[("none", "fp32")]
    lines = [
        "| quantization | compute | client peak RSS MiB | ÷ none fp32 | ÷ none same dtype "
        "| RSS after load MiB | ÷ none same dtype | step s (fastest) | step CPU s | ÷ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (quantization, dtype), r in rows.items():
        same = rows[("none", dtype)]
        lines.append(
            f"| {quantization} | {dtype} "
            f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f} "
            f"| {r['peak_rss_mb'] / same['peak_rss_mb']:.2f} "
            f"| {r['loaded_rss_mb']:.0f} | {r['loaded_rss_mb'] / same['loaded_rss_mb']:.2f} "
            f"| {r['step_seconds']:.2f} | {r['step_cpu_seconds']:.2f} "
            f"| {r['step_cpu_seconds'] / ref['step_cpu_seconds']:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 1 round, 3 steps")
    parser.add_argument("--steps", type=int, default=0, help="client steps (default 10; 3)")
    parser.add_argument(
        "--clients-only", action="store_true", help="measure the clients, run no simulation"
    )
    parser.add_argument("--client", nargs="+", metavar="KEY=VALUE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 10)
    if args.client:
        print(json.dumps(measure_client(args.client, steps)))
        return

    from fedtune.models.base import model_dir

    model_dir("smollm2-135m")  # the one-time conversion, outside every measurement
    extra = QUICK if args.quick else []
    rows = {}
    for quantization in QUANTIZATIONS:
        for dtype in COMPUTE_DTYPES:
            row = measure(quantization, dtype, extra, steps, not args.clients_only)
            rows[(quantization, dtype)] = row
            print(f"{quantization}/{dtype}: {json.dumps(row)}", file=sys.stderr, flush=True)
    flags = [f for f, on in (("--quick", args.quick), ("--clients-only", args.clients_only)) if on]
    command = " ".join(["python benchmarks/quantization.py", *flags])
    print(f"Command: `{command}` ({steps} client steps per combination)")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )
    print()
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
