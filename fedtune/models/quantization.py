"""Quantized frozen bases: the decoder's Linear layers in int8 or 4 bits, LoRA on top.

Each choice of ``model.quantization`` uses the maintained library for its format whose
layers PEFT wraps with its own LoRA layer, and which runs forward and backward on CPU:

- ``int8``: torchao ``quantize_(..., Int8WeightOnlyConfig())``, symmetric int8 with one
  scale per output row (the layer stays an ``nn.Linear`` holding a torchao
  ``Int8Tensor``).
- ``nf4``: bitsandbytes ``Linear4bit`` with QLoRA's NormalFloat4, one absmax per block
  of 64 weights.
- ``int4``: HQQ ``HQQLinear``, 4-bit with a scale and a zero point per group of 64
  (torchao has no packed int4 on x86 CPU: its int4 stores a byte per weight). It is the
  layer HQQ's ``AutoHQQHFModel.quantize_model`` builds; building it here, per decoder
  layer, skips that helper's progress bars and its recasting of every other module.

Blocks and groups of 64 divide every layer of SmolLM2-135M (576, 192, 1536) and of the
tiny test models (hidden size 64); HQQ also needs an even number of groups per layer.

Only the decoder's Linear layers (attention and MLP projections) are quantized; the
embeddings and ``lm_head`` (tied to them in SmolLM2: 28 M of its 135 M parameters) stay
in ``compute_dtype``, so the logits keep their precision. Those decoder weights then
take a quarter (int8) or a sixth to an eighth (4-bit, scales included) of their fp32
size. A client's peak memory does not fall with them (measured in
``benchmarks/RESULTS.md``): the base is loaded in ``compute_dtype`` before it is
quantized, the layers still compute in ``compute_dtype``, at small batches activations
and the vocabulary logits dominate a step, and torchao's weight-only int8 linear runs
above autograd, which saves a full-precision copy of each weight for the backward
(bitsandbytes and HQQ save the packed weight and dequantize again in the backward).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from fedtune.errors import ModelError

QUANTIZATIONS = ("none", "int8", "nf4", "int4")
"""Values of ``model.quantization``."""
GROUP_SIZE = 64
"""Weights per bitsandbytes block and per HQQ group (scale/zero shared within one)."""

_BACKENDS = {
    "int8": ("torchao", "torchao>=0.18,<0.19"),
    "nf4": ("bitsandbytes", "bitsandbytes>=0.50,<0.51"),
    "int4": ("hqq", "hqq>=0.2.8,<0.3"),
}

# PEFT imports torchao and bitsandbytes in every process that attaches LoRA, and both
# log on import about optional kernels this CPU-only, offline setup cannot have:
# torchao's CUDA extensions (and torch's notice about enums torchao registers), and a
# bitsandbytes CPU kernel fetched from the Hugging Face hub at run time. Both then work
# with what their wheels ship; keep these lines out of every run's log.
_IMPORT_NOISE = {
    "torchao": "Failed to load ",
    "torch.utils._pytree": "is an Enum subclass and is now natively supported",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
}
def _without(text: str) -> logging.Filter:
    """A filter that drops records whose message holds ``text``."""
    noise = logging.Filter()
    noise.filter = lambda record: text not in record.getMessage()  # type: ignore[method-assign]
    return noise


for _name, _text in _IMPORT_NOISE.items():
    logging.getLogger(_name).addFilter(_without(_text))


def quantize_base(model: Any, quantization: str, compute_dtype: torch.dtype) -> Any:
    """Quantize the decoder Linear layers of a causal LM in place; return the model."""
    if quantization not in QUANTIZATIONS:
        raise ModelError(
            f"unknown model.quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}"
        )
    if quantization == "none":
        return model
    require_backend(quantization)
    decoder = getattr(model.get_decoder(), "layers", None)
    if decoder is None:
        raise ModelError(
            f"model.quantization = {quantization!r} needs a Llama-style decoder with "
            f"`layers`; {type(model).__name__} has none"
        )
    if quantization == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(decoder, Int8WeightOnlyConfig())
    elif quantization == "nf4":
        _replace_linears(decoder, lambda linear: _nf4(linear, compute_dtype))
        # PEFT picks its bitsandbytes LoRA layer only for models that carry this flag
        # (transformers sets it when it loads a model in 4 bits).
        model.is_loaded_in_4bit = True
    else:
        _replace_linears(decoder, lambda linear: _hqq_int4(linear, compute_dtype))
    return model


def require_backend(quantization: str) -> None:
    module, requirement = _BACKENDS[quantization]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(
            f"model.quantization = {quantization!r} needs the {module} package, which is "
            f"not installed ({exc}): pip install '{requirement}' (or run `make setup`)"
        ) from exc


def _replace_linears(root: torch.nn.Module, make: Callable[[torch.nn.Linear], Any]) -> None:
    linears = [(n, m) for n, m in root.named_modules() if type(m) is torch.nn.Linear]
    for name, linear in linears:
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent), attr, make(linear))


def _nf4(linear: torch.nn.Linear, compute_dtype: torch.dtype) -> Any:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        quant_type="nf4",
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data, blocksize=GROUP_SIZE, quant_type="nf4", module=layer
    )
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    # On AVX512-BF16 CPUs, the first no-grad eval forward repacks the weight in place for
    # an inference kernel that has no backward: training after an evaluation would then
    # backpropagate through nothing, silently (seen with bitsandbytes 0.50.2).
    layer.support_avx512bf16_for_cpu = False
    return layer.to("cpu")  # moving a Params4bit to a device is what quantizes it


def _hqq_int4(linear: torch.nn.Linear, compute_dtype: torch.dtype) -> Any:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    # HQQ packs two rows of groups into one row of bytes: it needs an even number of groups.
    if linear.weight.numel() % (2 * GROUP_SIZE):
        raise ModelError(
            f"model.quantization = 'int4' needs layers whose weight count is a multiple of "
            f"{2 * GROUP_SIZE}; a {linear.out_features}x{linear.in_features} layer is not"
        )
    config = BaseQuantizeConfig(nbits=4, group_size=GROUP_SIZE)
    return HQQLinear(linear, config, compute_dtype=compute_dtype, device="cpu")
