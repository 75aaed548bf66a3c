"""The baseline for fedtune's overhead: the same federated work in one bare torch loop.

It replays a fedtune run: the same rounds, the same sampled clients (read from the
run's ``metrics.jsonl``), the same chunks, batches, seeds and steps, a hand-written
FedAvg, and the same held-out evaluations — with no Flower, no Ray, no messages, no
validation and no files. Its final perplexity should match the run's, which shows
the two did the same work.

    python benchmarks/bare_loop.py RUN_DIR      # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()

    from fedtune.config import load_scenario
    from fedtune.data import build_population, client_train_chunks, eval_chunks
    from fedtune.evaluation import perplexity
    from fedtune.metrics import read_events
    from fedtune.models import adapter_state, attach_lora, load_base_model, load_tokenizer

    s = load_scenario(args.run_dir / "scenario.toml")
    sampled: dict[int, list[int]] = {}
    for event in read_events(args.run_dir / "metrics.jsonl", "client_update"):
        sampled.setdefault(event["round"], []).append(event["client"])

    population = build_population(s.data)
    tokenizer = load_tokenizer(s.model.name)
    held_out = eval_chunks(tokenizer, population, s.data, s.client.seq_len)
    model = attach_lora(
        load_base_model(s.model.name, s.model.compute_dtype, s.model.num_layers), s.lora, s.run.seed
    )
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    global_weights = {n: p.detach().clone() for n, p in lora.items()}
    ppls = [perplexity(model, held_out, s.run.eval_batch_size)]
    train_seconds: list[float] = []

    for rnd in sorted(sampled):
        total = {n: torch.zeros_like(w) for n, w in global_weights.items()}
        weight = 0
        for index in sorted(sampled[rnd]):
            chunks = client_train_chunks(
                tokenizer, population.train[index], s.data, s.client.seq_len
            )
            for n, p in lora.items():
                p.data.copy_(global_weights[n])
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(
                lora.values(), lr=s.client.lr, weight_decay=s.client.weight_decay
            )
            seed = int(np.random.SeedSequence([s.run.seed, rnd, index]).generate_state(1)[0])
            generator = torch.Generator().manual_seed(seed)
            order: list[int] = []
            while len(order) < s.client.local_steps * s.client.batch_size:
                order.extend(torch.randperm(len(chunks), generator=generator).tolist())
            t0 = time.perf_counter()
            model.train()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for step in range(s.client.local_steps):
                    batch = chunks[
                        order[step * s.client.batch_size : (step + 1) * s.client.batch_size]
                    ]
                    model(input_ids=batch, labels=batch).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            model.eval()
            train_seconds.append(time.perf_counter() - t0)
            examples = s.client.local_steps * s.client.batch_size
            for n, p in lora.items():
                total[n] += p.detach() * examples
                p.requires_grad_(False)
            weight += examples
        global_weights = {n: t / weight for n, t in total.items()}
        for n, p in lora.items():
            p.data.copy_(global_weights[n])
        ppls.append(perplexity(model, held_out, s.run.eval_batch_size))

    _ = adapter_state(model)
    print(
        json.dumps(
            {
                "wall_seconds": time.perf_counter() - started,
                "perplexities": ppls,
                "client_train_seconds_mean": sum(train_seconds) / len(train_seconds),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            }
        )
    )


if __name__ == "__main__":
    main()
