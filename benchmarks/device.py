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
# ORT's defaults (what the client used before issue 14) and a phone's settings
# (fedtune.ondevice.engines.PHONE); a lever row turns one phone setting back on.
DEFAULTS = {
    "arena": True,
    "memory_pattern": True,
    "memory_reuse": True,
    "spinning": True,
    "optimize_training": True,
    "mmap_threshold": 0,
}
PHONE: dict = {}
# (row label, gateway.artifact_int8, engine, session settings): what a phone downloads
# and how it opens it. The first row of each engine is the reference (fp32 artifacts,
# ORT's default session) for losses and step time.
VARIANTS = [
    ("training, fp32, ORT defaults", "none", "backprop", DEFAULTS),
    ("training, fp32, phone session", "none", "backprop", PHONE),
    ("training, int8 weights, phone session", "int4", "backprop", PHONE),
    ("  lever off: memory reuse on", "int4", "backprop", {"memory_reuse": True}),
    ("  lever off: no per-layer recomputation", "int4", "backprop", {"graph": "no-layers"}),
    ("  lever off: arena on", "int4", "backprop", {"arena": True}),
    ("  lever off: memory pattern on", "int4", "backprop", {"memory_pattern": True}),
    ("  lever off: graph optimizations on", "int4", "backprop", {"optimize_training": True}),
    ("  lever off: glibc's default mmap threshold", "int4", "backprop", {"mmap_threshold": 0}),
    ("inference, fp32, ORT defaults", "none", "zeroth", DEFAULTS),
    ("inference, fp32, phone session", "none", "zeroth", PHONE),
    ("inference, int8 weights, phone session", "weights", "zeroth", PHONE),
    ("inference, int4 MatMulNBits, phone session", "int4", "zeroth", PHONE),
    ("  lever off: arena on", "int4", "zeroth", {"arena": True}),
    ("  lever off: memory pattern on", "int4", "zeroth", {"memory_pattern": True}),
    ("  lever off: glibc's default mmap threshold", "int4", "zeroth", {"mmap_threshold": 0}),
    ("inference, int8 dynamic, phone session", "dynamic", "zeroth", PHONE),
]
# Training-graph levers: a row whose settings name a "graph" runs the built training
# model with that rewrite of fedtune.ondevice.artifacts.recompute_in_backward undone.


def training_graph_variant(source: Path, kind: str, out: Path) -> Path:
    """``source`` (a built training model) with one lever undone, saved as ``out``:
    ``no-layers`` recomputes only dequantizations and loss slices (as the build did:
    the same weights' re-dequantization and gate, if any)."""
    import onnx

    from fedtune.ondevice.artifacts import backward_after_loss, recompute_in_backward

    graph = onnx.load(str(source))
    nodes = list(graph.graph.node)
    gate = "loss_grad_after_loss"
    gated = any(n.name.startswith(gate) for n in nodes)
    weights = any(n.op_type == "DequantizeLinear" and n.name.endswith("_recompute") for n in nodes)
    if kind == "no-layers":  # back to generate_artifacts' graph, then the rewrite without layers
        clones = {o for n in nodes if n.name.endswith("_recompute") for o in n.output}
        nodes = [n for n in nodes if not n.name.endswith("_recompute")]
        nodes = [n for n in nodes if not n.name.startswith(gate)]
        rename = {o: o.removesuffix("_recompute") for o in clones} | {gate: "loss_grad"}
    else:
        raise ValueError(kind)
    for node in nodes:
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    if kind == "no-layers":
        kept = [t for t in graph.graph.initializer if not t.name.endswith("_recompute")]
        del graph.graph.initializer[:]
        graph.graph.initializer.extend(kept)
        recompute_in_backward(graph, layers=False, weights=weights)
        if gated:
            backward_after_loss(graph)
    onnx.save(graph, str(out))
    return out


FILES = {
    "backprop": ("training_model", "eval_model", "optimizer_model", "checkpoint"),
    "zeroth": ("inference_model",),
}


def child(spec: dict) -> dict:
    """One device-client task in this (fresh) process: no torch, no flwr."""
    import numpy as np

    from fedtune.metrics import peak_rss_mb
    from fedtune.ondevice.engines import ENGINES, SessionSettings, chunk_text, read_text
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
    settings = SessionSettings(**spec["settings"])
    result = ENGINES[spec["engine"]](paths, adapter, specs, chunks, config, settings)
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


def build(model: str, cache: Path, modes: list[str]) -> dict[str, dict]:
    """Build the artifact sets of ``modes``; per mode its files, sizes and build seconds."""
    from fedtune.config import LoraConfig
    from fedtune.ondevice.artifacts import build_artifacts

    lora = LoraConfig(r=8, alpha=16, dropout=0.0, targets=("q_proj", "v_proj"))
    built = {}
    for int8 in modes:
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
    """One row per variant; time and losses against the engine's reference row (the
    fp32 artifacts in ORT's default session), measured in the same run."""
    lines = [
        "| artifacts, session | engine | files MB | set-up s | wall s/step (median) | "
        "CPU s/step (median) | x reference CPU | peak RSS MiB | saved vs the row above "
        "MiB | first-step loss | max |loss - reference| (5 steps) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference: dict[str, dict] = {}
    previous: dict | None = None
    for r in rows:
        ref = reference.setdefault(r["engine"], r)
        wall, cpu = statistics.median(r["step_wall_s"]), statistics.median(r["step_cpu_s"])
        ratio = cpu / statistics.median(ref["step_cpu_s"])
        drift = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"], strict=True))
        lever = r["label"].startswith("  ")
        above = previous if previous is not None and previous["engine"] == r["engine"] else r
        saved = (
            r["peak_rss_mib"] - above["peak_rss_mib"]
            if lever
            else above["peak_rss_mib"] - r["peak_rss_mib"]
        )
        lines.append(
            f"| {r['label'].strip()} | {r['engine']} | {r['total_mb']:.1f} | "
            f"{r['setup_s']:.1f} | "
            f"{wall:.2f} | {cpu:.2f} | {ratio:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{saved:+.0f} | {r['losses'][0]:.4f} | {drift:.4f} |"
        )
        if not lever:
            previous = r
    return "\n".join(lines)


def footprints(rows: list[dict], model: str, lora: dict, batch: int, seq_len: int) -> list[dict]:
    """The phone-session rows as the fleet's footprint table (fedtune.ondevice.footprint)."""
    kinds = {"none": "none", "weights": "int8", "int4": "int4", "dynamic": "int8-dynamic"}
    out = []
    for r in rows:
        if "phone session" not in r["label"]:
            continue
        training = r["engine"] == "backprop"
        out.append(
            {
                "model": model,
                "lora_r": lora["r"],
                "lora_targets": lora["targets"],
                "engine": r["engine"],
                "artifact": "training" if training else "inference",
                # the training artifacts of int4 sets keep int8 weights (no 4-bit gradient)
                "quantization": "int8" if training and r["int8"] == "int4" else kinds[r["int8"]],
                "batch_size": batch,
                "seq_len": seq_len,
                "peak_rss_mib": round(r["peak_rss_mib"]),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=5, help="local steps per variant")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=None, help="artifact cache (default: new)")
    parser.add_argument(
        "--write-footprints", action="store_true", help="update the shipped footprint table"
    )
    parser.add_argument("--engine", default="", help="run only this engine's rows")
    parser.add_argument("--modes", default="", help="only these artifact_int8 modes (a,b)")
    parser.add_argument("--only", default="", help="run only the rows whose label has this")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return

    with tempfile.TemporaryDirectory(prefix="fedtune-device-bench-") as tmp:
        folder = Path(tmp)
        cache = args.cache or folder / "artifacts"
        data = shakespeare_text(folder, 20_000)
        variants = [
            v
            for v in VARIANTS
            if (not args.only or args.only in v[0])
            and (not args.engine or v[2] == args.engine)
            and (not args.modes or v[1] in args.modes.split(","))
        ]
        built = build(args.model, cache, sorted({v[1] for v in variants}))
        rows = []
        for label, int8, engine, settings in variants:
            b = built[int8]
            paths = dict(b["paths"])
            if "graph" in settings:  # made here: the device process imports no onnx
                kind = settings["graph"]
                settings = {k: v for k, v in settings.items() if k != "graph"}
                source = Path(paths["training_model"])
                out = source.with_name(f"training_model.{kind}.onnx")
                paths["training_model"] = str(training_graph_variant(source, kind, out))
            spec = {
                "paths": paths,
                "adapter": b["adapter"],
                "data": str(data),
                "engine": engine,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "lr": 2e-3 if engine == "backprop" else 1e-3,
                "eps": 1e-2,
                "settings": settings,
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
    some = next(iter(built.values()))
    print(f"tokenizer.json: {some['sizes']['tokenizer'] / MB:.1f} MB (every variant)")
    print(table(rows))
    if args.write_footprints:
        from fedtune.ondevice.footprint import write_measured

        lora = {"r": 8, "targets": ["q_proj", "v_proj"]}
        measured = footprints(rows, args.model, lora, args.batch_size, args.seq_len)
        path = write_measured(measured)
        print(f"footprints: {len(measured)} rows -> {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
