"""A PEFT LoRA adapter as a GGUF LoRA adapter, the file llama.cpp applies at load time.

llama.cpp's conventions (its ``convert_lora_to_gguf.py``, which needs a checkout of
llama.cpp and the HF base model's folder, hence written here against the ``gguf``
package instead):

- metadata ``general.type = "adapter"``, ``adapter.type = "lora"``,
  ``adapter.lora.alpha``, and ``general.architecture`` equal to the base's;
- one pair of tensors per adapted weight, named after the base tensor's GGUF name:
  ``blk.0.attn_q.weight.lora_a`` (PEFT's A, ``(r, in)``) and ``....lora_b`` (B,
  ``(out, r)``); llama.cpp scales ``B @ A`` by ``alpha / r`` as PEFT does;
- the GGUF base stores Llama's q and k projections with their rows permuted for its
  rotary layout (transformers undoes it when it reads a GGUF): the output rows of
  ``B`` get the same permutation, ``A`` is untouched.

The HF -> GGUF tensor names come from the ``gguf`` package's own name map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedtune.errors import FedtuneError

# HF model_type -> (GGUF architecture name, permute q/k rows like llama.cpp's converter).
# Mistral-family checkpoints convert to llama.cpp's "llama" architecture.
GGUF_ARCHS: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "gemma": ("gemma", False),
    "gemma2": ("gemma2", False),
    "gemma3_text": ("gemma3", False),
    "phi3": ("phi3", False),
}


def llama_rope_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (or of its LoRA B) in llama.cpp's rotary order: the
    inverse of what transformers' GGUF reader applies to Llama's attn_q/attn_k."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def lora_pairs(model: Any) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """(module path, A, B, alpha) of every LoRA layer of a PEFT model, in name order."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for path, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().float().cpu()
            b = module.lora_B["default"].weight.detach().float().cpu()
            alpha = float(module.lora_alpha["default"])
            pairs.append((path.removeprefix("base_model.model."), a, b, alpha))
    return pairs


def write_gguf_lora(
    model: Any, path: Path, name: str = "fedtune", permute_qk: bool | None = None
) -> Path:
    """Write the adapter of PEFT ``model`` as a GGUF LoRA adapter at ``path``.

    ``permute_qk=False`` skips Llama's rotary row order: a deliberately wrong file, the
    control of ``benchmarks/gguf_lora_check.py``.
    """
    import gguf
    import numpy as np

    config = model.base_model.model.config
    if config.model_type not in GGUF_ARCHS:
        raise FedtuneError(
            f"no GGUF export for model type {config.model_type!r} (known: "
            f"{', '.join(sorted(GGUF_ARCHS))}): export 'merged' and convert it with llama.cpp"
        )
    arch, permute = GGUF_ARCHS[config.model_type]
    permute = permute if permute_qk is None else permute_qk and permute
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    pairs = lora_pairs(model)
    alphas = {alpha for *_, alpha in pairs}
    if len(alphas) != 1:  # llama.cpp reads one alpha per adapter file
        raise FedtuneError(f"the adapter's layers have different alphas {sorted(alphas)}")

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alphas.pop())
    writer.add_name(name)
    for module_path, a, b, _ in pairs:
        base = names.get_name(module_path)
        if base is None:
            raise FedtuneError(f"no GGUF tensor for {module_path} in architecture {arch!r}")
        if permute and base.endswith(("attn_q", "attn_k")):
            heads = config.num_attention_heads
            if base.endswith("attn_k"):
                heads = config.num_key_value_heads or heads
            b = llama_rope_permute(b, heads)
        # numpy's (rows, cols) is GGUF's ne = [cols, rows]: A (r, in) and B (out, r) are
        # what llama.cpp checks against the base weight's ne = [in, out].
        writer.add_tensor(f"{base}.weight.lora_a", np.ascontiguousarray(a.numpy()))
        writer.add_tensor(f"{base}.weight.lora_b", np.ascontiguousarray(b.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
