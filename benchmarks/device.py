"""Phones: the on-device artifacts of SmolLM2-135M and the device client's local steps.

Builds the artifacts a run serves to phones (``fedtune.ondevice.artifacts.build_artifacts``) for
the quickstart's model and LoRA (r=8, alpha=16 on q_proj, v_proj), once per
``gateway.artifact_int8`` (``none``, ``weights``, ``dynamic``), into a fresh cache so
every build is timed. Then, per artifact variant, a fresh subprocess does what
``fedtune device`` does for a task (``fedtune/ondevice/engines.py``'s ``chunk_text`` and
``train_backprop`` / ``train_zeroth``; no torch, no flwr, so its peak RSS is a phone
client's) on one Shakespeare role: ``--steps`` local steps of 4x128 tokens from a
PEFT-style fresh adapter (A random, B zero). A ``zeroth`` step is two forwards (MeZO).

Prints a Markdown table for ``benchmarks/RESULTS.md`` and the raw figures as JSON:
file sizes (MB), build seconds, session set-up seconds, median wall and CPU seconds
per step (CPU seconds are ``time.process_time``: all threads, steadier than wall time
when the cores are shared), peak RSS (MiB) and the first step's loss.

    nice -n 19 .venv/bin/python benchmarks/device.py
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6
# (row label, gateway.artifact_int8, engine): the artifacts a phone downloads for it.
VARIANTS = [
    ("training, fp32", "none", "backprop"),
    ("training, int8 weights", "weights", "backprop"),
    ("inference, fp32", "none", "zeroth"),
    ("inference, int8 weights", "weights", "zeroth"),
    ("inference, int8 dynamic", "dynamic", "zeroth"),
]
FILES = {
    "backprop": ("training_model", "eval_model", "optimizer_model", "checkpoint"),
    "zeroth": ("inference_model",),
}


def child(spec: dict) -> dict:
    """One device-client task in this (fresh) process: no torch, no flwr."""
    import numpy as np

    from fedtune.metrics import peak_rss_mb
    from fedtune.ondevice.engines import ENGINES, chunk_text, read_text
    from fedtune.ondevice.proto import device_pb2 as pb

    paths = {name: Path(p) for name, p in spec["paths"].items()}
    chunks = chunk_text(paths["tokenizer"], read_text(Path(spec["data"])), spec["seq_len"])
    rng = np.random.default_rng(0)
    adapter, specs = {}, []
    for key, shape, graph_name in spec["adapter"]:
        if "lora_A" in key:  # PEFT's default init: kaiming-uniform A, zero B
            bound = 1.0 / math.sqrt(shape[1])
            adapter[key] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            adapter[key] = np.zeros(shape, np.float32)
        specs.append(pb.TensorSpec(name=key, shape=shape, graph_name=graph_name))
    config = pb.TrainConfig(
        engine=spec["engine"],
        lr=spec["lr"],
        local_steps=spec["steps"],
        batch_size=spec["batch_size"],
        seq_len=spec["seq_len"],
        seed=0,
        eps=spec["eps"],
        run_seed=0,
        num_seeds=4096,
    )
    result = ENGINES[spec["engine"]](paths, adapter, specs, chunks, config)
    walls = [w for w, _ in result.step_seconds]
    cpus = [c for _, c in result.step_seconds]
    return {
        "setup_s": result.seconds - sum(walls),
        "step_wall_s": walls,
        "step_cpu_s": cpus,
        "losses": result.losses,
        "peak_rss_mib": peak_rss_mb(),
        "torch_imported": "torch" in sys.modules,
    }


def shakespeare_text(folder: Path, min_chars: int) -> Path:
    """The first role (sorted by id) with at least ``min_chars`` characters, as a file."""
    from fedtune.data.sources import load_shakespeare

    role = next(c for c in load_shakespeare() if len(c.text) >= min_chars)
    path = folder / "role.txt"
    path.write_text(role.text)
    print(f"data: {role.client_id} ({len(role.text):,} characters)", file=sys.stderr)
    return path


def build(model: str, cache: Path) -> dict[str, dict]:
    """Build the three artifact sets; per int8 mode its files, sizes and build seconds."""
    from fedtune.config import LoraConfig
    from fedtune.ondevice.artifacts import build_artifacts

    lora = LoraConfig(r=8, alpha=16, dropout=0.0, targets=("q_proj", "v_proj"))
    built = {}
    for int8 in ("none", "weights", "dynamic"):
        started = time.perf_counter()
        artifacts = build_artifacts(model, 0, lora, cache=cache, int8=int8)
        seconds = time.perf_counter() - started
        manifest = json.loads((artifacts.folder / "manifest.json").read_text())
        built[int8] = {
            "seconds": seconds,
            "parts": manifest.get("build_seconds", {}),
            "paths": {name: str(f.path) for name, f in artifacts.files.items()},
            "sizes": {name: f.size for name, f in artifacts.files.items()},
            "adapter": [[t.key, list(t.shape), t.graph_name] for t in artifacts.adapter],
        }
        print(f"built int8={int8} in {seconds:.1f} s: {built[int8]['sizes']}", file=sys.stderr)
    return built


def table(rows: list[dict]) -> str:
    lines = [
        "| artifacts | engine | files MB | total MB | build s | set-up s | wall s/step "
        "(median) | CPU s/step (median) | peak RSS MiB | first-step loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        files = " + ".join(f"{r['sizes'][n] / MB:.1f}" for n in FILES[r["engine"]])
        wall, cpu = statistics.median(r["step_wall_s"]), statistics.median(r["step_cpu_s"])
        lines.append(
            f"| {r['label']} | {r['engine']} | {files} | {r['total_mb']:.1f} | "
            f"{r['build_s']:.1f} | {r['setup_s']:.1f} | {wall:.2f} | {cpu:.2f} | "
            f"{r['peak_rss_mib']:.0f} | "
            f"{r['losses'][0]:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=5, help="local steps per variant")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=None, help="artifact cache (default: new)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return

    with tempfile.TemporaryDirectory(prefix="fedtune-device-bench-") as tmp:
        folder = Path(tmp)
        cache = args.cache or folder / "artifacts"
        data = shakespeare_text(folder, 20_000)
        built = build(args.model, cache)
        rows = []
        for label, int8, engine in VARIANTS:
            b = built[int8]
            spec = {
                "paths": b["paths"],
                "adapter": b["adapter"],
                "data": str(data),
                "engine": engine,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "lr": 2e-3 if engine == "backprop" else 1e-3,
                "eps": 1e-2,
            }
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=False,
            )
            if out.returncode != 0:
                raise SystemExit(f"{label}: the device process failed:\n{out.stderr[-3000:]}")
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            part = "training" if engine == "backprop" else "inference"
            rows.append(
                {
                    "label": label,
                    "int8": int8,
                    "engine": engine,
                    "sizes": b["sizes"],
                    "total_mb": sum(b["sizes"][n] for n in FILES[engine]) / MB,
                    "build_s": b["parts"].get(part, float("nan")),
                    **measured,
                }
            )
            print(f"{label}: {json.dumps(measured)}", file=sys.stderr)
    print(json.dumps(rows, indent=1))
    print()
    print(f"tokenizer.json: {built['none']['sizes']['tokenizer'] / MB:.1f} MB (every variant)")
    print(table(rows))


if __name__ == "__main__":
    main()
