"""Does llama.cpp, given the GGUF base and fedtune's GGUF LoRA export, predict what the
merged torch model predicts?

For a finished run (SmolLM2 or Gemma-3, the models fedtune converts from a GGUF), on
the run's held-out chunks (roles that never trained):

1. torch: next-token log-probabilities of the base and of the merged model (PEFT's
   ``merge_and_unload`` of the run's adapter; base weights = the GGUF's dequantized);
2. llama.cpp (llama-cpp-python, in its own environment): the same token ids through
   the GGUF base alone, and through the base with ``fedtune export --format gguf``'s
   adapter applied at load time;
3. top-1 agreement and mean KL(torch || llama.cpp) per position for each pair, and
   the perplexity of each model on the chunks.

The base-vs-base pair is the floor set by llama.cpp's quantized arithmetic; the
adapter pair should sit near it, and far from the llama.cpp base vs torch merged pair.
A control adapter written without Llama's q/k row permutation (a wrong file) shows
what a convention mistake would cost.

    .venv/bin/python benchmarks/gguf_lora_check.py RUN_DIR \
        --llama-python /tmp/llamacpp-venv/bin/python [--chunks 16]

llama-cpp-python builds from source (cmake, a compiler): install it into a separate
environment, e.g. ``python -m venv /tmp/llamacpp-venv &&
/tmp/llamacpp-venv/bin/pip install llama-cpp-python numpy``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# Runs inside llama-cpp-python's environment: argv = base.gguf adapter.gguf|- ids.npy out.npy
LLAMA_SIDE = r"""
import sys, numpy as np
from llama_cpp import Llama
base, adapter, ids_path, out_path = sys.argv[1:5]
ids = np.load(ids_path)
llm = Llama(model_path=base, lora_path=None if adapter == "-" else adapter,
            n_ctx=int(ids.shape[1]) + 8, logits_all=True, n_threads=2, n_batch=512,
            verbose=False)
out = np.zeros((*ids.shape, llm.n_vocab()), dtype=np.float32)
for i, row in enumerate(ids):
    llm.reset()
    llm.eval([int(t) for t in row])
    out[i] = np.asarray(llm.scores[: ids.shape[1]], dtype=np.float32)
np.save(out_path, out)
"""


def log_softmax(x: np.ndarray) -> np.ndarray:
    # float32: five (chunks, 128, vocab) arrays in float64 would need ~6 GB at 24 chunks.
    x = x.astype(np.float32)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(p: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean KL(p || q) per position (log-probabilities in)."""
    top1 = float((p.argmax(-1) == q.argmax(-1)).mean())
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    return {"top1_agreement": top1, "kl": kl}


def perplexity(logp: np.ndarray, ids: np.ndarray) -> float:
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1).mean()
    return float(np.exp(nll))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--llama-python", required=True, help="python with llama_cpp")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument(
        "--work", type=Path, default=None, help="keep (and reuse) llama.cpp's outputs here"
    )
    args = parser.parse_args()

    import torch

    from fedtune.data import build_population, eval_chunks
    from fedtune.models.base import base_gguf, load_tokenizer
    from fedtune.models.export import export_run, load_run

    scenario, model = load_run(args.run_dir)
    tokenizer = load_tokenizer(scenario.model.name)
    population = build_population(scenario.data)
    chunks = eval_chunks(tokenizer, population, scenario.data, scenario.client.seq_len)
    ids = chunks[: args.chunks].to(torch.long)
    with torch.no_grad():
        with model.disable_adapter():
            torch_base = log_softmax(model(input_ids=ids).logits.float().numpy())
        merged = model.merge_and_unload()
        torch_merged = log_softmax(merged(input_ids=ids).logits.float().numpy())

    work = args.work or Path(tempfile.mkdtemp(prefix="gguf-check-"))
    adapter = work / "export" / "adapter.gguf"
    if not adapter.is_file():
        export_run(args.run_dir, "gguf", work / "export")
    runs = [("base", "-"), ("adapter", str(adapter))]
    if scenario.model.name == "smollm2-135m":  # Llama: q/k rows are permuted in GGUF
        from fedtune.models.gguf_lora import write_gguf_lora

        _, fresh = load_run(args.run_dir)
        control = work / "unpermuted.gguf"
        if not control.is_file():
            write_gguf_lora(fresh, control, permute_qk=False)
        runs.append(("control", str(control)))
    np.save(work / "ids.npy", ids.numpy().astype(np.int32))
    llama = {}
    for label, lora in runs:
        out = work / f"{label}.npy"
        if out.is_file():
            llama[label] = log_softmax(np.load(out))
            continue
        subprocess.run(
            [
                args.llama_python,
                "-c",
                LLAMA_SIDE,
                str(base_gguf(scenario.model.name)),
                lora,
                str(work / "ids.npy"),
                str(out),
            ],
            check=True,
        )
        llama[label] = log_softmax(np.load(out))

    ids_np = ids.numpy()
    result = {
        "model": scenario.model.name,
        "chunks": int(ids.shape[0]),
        "tokens_per_chunk": int(ids.shape[1]),
        "adapter_bytes": adapter.stat().st_size,
        "llama.cpp+adapter vs torch merged": compare(torch_merged, llama["adapter"]),
        "llama.cpp base vs torch base (floor)": compare(torch_base, llama["base"]),
        "llama.cpp base vs torch merged (no adapter)": compare(torch_merged, llama["base"]),
        **(
            {
                "control: q/k rows unpermuted vs torch merged": compare(
                    torch_merged, llama["control"]
                )
            }
            if "control" in llama
            else {}
        ),
        "perplexity": {
            "torch base": perplexity(torch_base, ids_np),
            "torch merged": perplexity(torch_merged, ids_np),
            "llama.cpp base": perplexity(llama["base"], ids_np),
            "llama.cpp+adapter": perplexity(llama["adapter"], ids_np),
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
