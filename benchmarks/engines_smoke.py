"""One engine on the real model: step time, peak memory and held-out loss, round by round.

SmolLM2-135M with LoRA r=8 on q_proj and v_proj trains on one Shakespeare role (the
longest) for a few rounds of ``--steps`` local steps each; the adapter carries over
from round to round, the optimizer does not (as on a client). After each round the loss
on a fixed held-out set (another role) is printed, evaluated a chunk at a time so that
the peak RSS is training's. Wall time suffers when other processes share the cores;
CPU seconds (this process, all its threads) much less so. Peak RSS is per process, so
run one engine per call:

    python benchmarks/engines_smoke.py zeroth --set lr=1e-3 --set eps=1e-2
    python benchmarks/engines_smoke.py forward --rounds 2 --steps 3 --set perturbations=4

``--set`` overrides any field of the engine's settings (:data:`fedtune.engines.SETTINGS`;
``[client]``'s defaults otherwise). Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="local steps per round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--eval-chunks", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args()

    from fedtune.config import LoraConfig, load_scenario
    from fedtune.data import chunk_tokens
    from fedtune.data.sources import load_shakespeare
    from fedtune.engines import SETTINGS, engine_settings, get_engine
    from fedtune.metrics import peak_rss_mb
    from fedtune.models import attach_lora, load_base_model, load_tokenizer

    types = {f.name: f.type for f in dataclasses.fields(SETTINGS[args.engine])}
    overrides = dict(item.split("=", 1) for item in args.set)
    unknown = sorted(set(overrides) - set(types))
    if unknown:
        parser.error(f"unknown {args.engine} settings {unknown}: use {', '.join(types)}")
    casts = {"float": float, "int": int, "str": str}
    settings = {k: casts[types[k]](v) for k, v in overrides.items()}

    tokenizer = load_tokenizer("smollm2-135m")
    roles = sorted(load_shakespeare(), key=lambda c: (-len(c.text), c.client_id))
    train = chunk_tokens(tokenizer, roles[0].text, args.seq_len)
    held_out = chunk_tokens(tokenizer, roles[1].text, args.seq_len)[: args.eval_chunks]
    model = attach_lora(
        load_base_model("smollm2-135m", args.dtype),
        LoraConfig(r=8, alpha=16, targets=("q_proj", "v_proj")),
        seed=0,
    )
    rss_loaded = peak_rss_mb()
    engine = get_engine(args.engine)
    losses = [_loss(model, held_out)]
    rounds = []
    for rnd in range(args.rounds):
        scenario = load_scenario(
            "quickstart",
            [
                "client.lr=1e-3",
                f"client.local_steps={args.steps}",
                f"client.batch_size={args.batch_size}",
                f"model.compute_dtype={args.dtype!r}",
            ],
        )
        config = dataclasses.replace(engine_settings(args.engine, scenario, seed=rnd), **settings)
        started, cpu = time.perf_counter(), time.process_time()
        update = engine.train(model, train, config)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        losses.append(_loss(model, held_out))
        rounds.append(
            {
                "step_seconds": round(seconds / args.steps, 3),
                "step_cpu_seconds": round(cpu / args.steps, 3),
                "train_loss": round(update.loss, 4),
                **{k: round(v, 4) for k, v in update.metrics.items()},
            }
        )
        print(f"round {rnd + 1}: held-out loss {losses[-1]:.4f}, {rounds[-1]}", flush=True)
    print(
        json.dumps(
            {
                "engine": args.engine,
                "dtype": args.dtype,
                "batch": [args.batch_size, args.seq_len],
                "config": dataclasses.asdict(config),
                "held_out_loss": [round(x, 4) for x in losses],
                "rounds": rounds,
                "rss_loaded_mb": round(rss_loaded),
                "peak_rss_mb": round(peak_rss_mb()),
            }
        )
    )


def _loss(model: torch.nn.Module, chunks: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [float(model(input_ids=c[None], labels=c[None]).loss) for c in chunks]
    return sum(losses) / len(losses)


if __name__ == "__main__":
    main()
