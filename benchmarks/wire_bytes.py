"""Upload size and error of each ``client.wire_dtype`` for a real SmolLM2-135M adapter.

Builds the quickstart's LoRA (r=8 on q,v of SmolLM2-135M-Instruct), gives B values of
a trained adapter's scale, encodes the update as each wire dtype, and reports the
protobuf size of the reply's array record (what ``bytes_up`` counts), the ratio to
fp32, the time to encode and decode, and the largest absolute error after decoding.

    .venv/bin/python benchmarks/wire_bytes.py
"""

from __future__ import annotations

import os
import platform
import time

import torch
from flwr.app import RecordDict


def main() -> None:
    from fedtune.config import LoraConfig
    from fedtune.models import adapter_state, attach_lora, load_base_model
    from fedtune.wire import _decode, encode_update, expected_specs, recorddict_nbytes

    model = attach_lora(load_base_model("smollm2-135m"), LoraConfig(r=8, alpha=16), seed=0)
    state = adapter_state(model)
    gen = torch.Generator().manual_seed(0)
    for key in state:
        if "lora_B" in key:  # B starts at zero; after training it is small and dense
            state[key] = torch.randn(state[key].shape, generator=gen) * 1e-3
    specs = expected_specs(state)
    params = sum(v.numel() for v in state.values())
    rows = []
    base = None
    for wire in ("fp32", "fp16", "int8"):
        t0 = time.perf_counter()
        record = encode_update(state, wire)
        t1 = time.perf_counter()
        decoded = _decode(record, specs, wire)
        t2 = time.perf_counter()
        size = recorddict_nbytes(RecordDict({"arrays": record}))
        base = base or size
        err = max(float((decoded[k] - state[k]).abs().max()) for k in state)
        rows.append((wire, size, size / base, (t1 - t0) * 1e3, (t2 - t1) * 1e3, err))
    print("Command: `.venv/bin/python benchmarks/wire_bytes.py`")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print(f"Adapter: SmolLM2-135M, LoRA r=8 on q,v, {params:,} parameters")
    print()
    print("| wire dtype | bytes up per update | ÷ fp32 | encode ms | decode ms | max abs error |")
    print("|---|---|---|---|---|---|")
    for wire, size, ratio, enc, dec, err in rows:
        print(f"| {wire} | {size:,} | {ratio:.3f} | {enc:.1f} | {dec:.1f} | {err:.2e} |")


if __name__ == "__main__":
    main()
