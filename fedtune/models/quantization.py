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
size, and a client's peak memory falls with them (``benchmarks/RESULTS.md``) because
nothing holds the full-precision decoder at any time:

- :func:`load_quantized` builds the model on the meta device and reads the safetensors
  file one decoder layer at a time, quantizing each layer before reading the next, so
  only one layer's weights ever exist in ``compute_dtype`` (the embeddings and head are
  read as they are);
- the int8 layer's backward dequantizes its weight again instead of keeping the
  forward's full-precision copy (torchao's weight-only linear runs above autograd,
  which would save one per layer); bitsandbytes and HQQ already save the packed weight.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
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
    if quantization == "none":
        return model
    require_backend(quantization)
    for layer in _decoder_layers(model, quantization):
        quantize_layer(layer, quantization, compute_dtype)
    return model


def _decoder_layers(model: Any, quantization: str) -> Any:
    decoder = getattr(model.get_decoder(), "layers", None)
    if decoder is None:
        raise ModelError(
            f"model.quantization = {quantization!r} needs a Llama-style decoder with "
            f"`layers`; {type(model).__name__} has none"
        )
    if quantization == "nf4":
        # PEFT picks its bitsandbytes LoRA layer only for models that carry this flag
        # (transformers sets it when it loads a model in 4 bits).
        model.is_loaded_in_4bit = True
    return decoder


def quantize_layer(layer: torch.nn.Module, quantization: str, compute_dtype: torch.dtype) -> None:
    """Replace the Linear layers under one decoder layer by their quantized form."""
    if quantization == "int8":
        _replace_linears(layer, _int8)
    elif quantization == "nf4":
        _replace_linears(layer, lambda linear: _nf4(linear, compute_dtype))
    else:
        _replace_linears(layer, lambda linear: _hqq_int4(linear, compute_dtype))


def load_quantized(
    folder: Path, config: Any, quantization: str, compute_dtype: torch.dtype
) -> Any | None:
    """The causal LM of ``folder``, its decoder quantized while it is read; None when
    the folder's weights are not safetensors (the caller then loads, then quantizes).

    The model is built on the meta device (buffers such as rotary frequencies are
    computed for real), then each decoder layer is read from the file, cast to
    ``compute_dtype`` and quantized before the next is read; everything else is read
    as is. Weights the file lacks are refused, as ``families.load_pretrained`` does.
    """
    import transformers
    from accelerate import init_empty_weights

    files = _safetensors_files(folder)
    if files is None:
        return None
    require_backend(quantization)
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=compute_dtype, attn_implementation="eager"
        )
    names = {id(m): n for n, m in model.named_modules()}
    where = {key: (f, entry) for f in files for key, entry in _safetensors_index(f).items()}
    for layer in _decoder_layers(model, quantization):
        _fill(layer, names[id(layer)], compute_dtype, where)
        quantize_layer(layer, quantization, compute_dtype)
        _release_freed_memory()
    _fill(model, "", compute_dtype, where)  # the embeddings, norms and head: what is left
    _release_freed_memory()
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ModelError(
            f"{folder} lacks {len(left)} weight(s) of {type(model).__name__} (e.g. "
            f"{', '.join(left[:3])}): complete the checkpoint"
        )
    return model


def _release_freed_memory() -> None:
    """Hand the memory freed by a layer's full-precision weights back to the system.

    glibc keeps freed blocks of a few MB in its heap (its mmap threshold rises to the
    largest block freed), so without this the process holds every layer's transient
    weights and quantization buffers: measured on SmolLM2-135M int8, 884 MiB resident
    anonymous memory after loading where the model needs ~230 MiB."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _safetensors_files(folder: Path) -> list[Path] | None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_index(path: Path) -> dict[str, tuple[int, dict[str, Any]]]:
    """Tensor name -> (offset of the data section, header entry) of a safetensors file."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return {name: (8 + size, entry) for name, entry in header.items()}


def _read_tensor(path: Path, located: tuple[int, dict[str, Any]]) -> torch.Tensor:
    """One tensor of a safetensors file, read into fresh memory. Not through a memory
    map (``safetensors.safe_open``): every page of the file read through the map counts
    in the process's resident memory while the map lives, ~540 MB for SmolLM2."""
    start, entry = located
    begin, end = entry["data_offsets"]
    tensor = torch.empty(entry["shape"], dtype=_SAFETENSORS_DTYPES[entry["dtype"]])
    with open(path, "rb") as handle:
        handle.seek(start + begin)
        handle.readinto(memoryview(tensor.view(torch.uint8).reshape(-1).numpy()))
    if end - begin != tensor.numel() * tensor.element_size():
        raise ModelError(f"{path}: tensor size does not match its header")
    return tensor


def _fill(module: torch.nn.Module, prefix: str, dtype: torch.dtype, where: dict[str, Any]) -> None:
    """Read ``module``'s meta-device parameters and buffers that the files hold
    (``where``: tensor name -> (file, its header entry)), floats cast to ``dtype``."""
    dot = f"{prefix}." if prefix else ""
    meta = [
        (name, isinstance(t, torch.nn.Parameter))
        for name, t in [*module.named_parameters(), *module.named_buffers()]
        if t.device.type == "meta" and dot + name in where
    ]
    for name, is_parameter in meta:
        value = _read_tensor(*where[dot + name])
        value = value.to(dtype) if value.is_floating_point() else value
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if is_parameter:
            setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=False))
        else:
            owner._buffers[leaf] = value


def require_backend(quantization: str) -> None:
    """Refuse an unknown quantization, or one whose library is not installed."""
    if quantization not in _BACKENDS:
        raise ModelError(
            f"unknown model.quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}"
        )
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


class Int8WeightOnlyLinear(torch.nn.Linear):
    """A Linear whose weight is torchao's per-row int8 ``Int8Tensor``, with a backward
    that dequantizes the weight again instead of keeping a full-precision copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        y = _Int8MatMul.apply(x, weight.qdata, weight.scale.reshape(-1))
        return y if self.bias is None else y + self.bias


class _Int8MatMul(torch.autograd.Function):
    """``x @ (qdata * scale[:, None]).T``; saves only the int8 matrix and its scales.

    ``setup_context`` and ``jvp`` make it work under ``torch.func`` transforms too (the
    forward engine's forward-mode AD, ``client.forward_derivative = "jvp"``)."""

    @staticmethod
    def forward(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> Any:
        return (x @ qdata.t().to(x.dtype)) * scale.to(x.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        _, qdata, scale = inputs
        ctx.save_for_backward(qdata, scale)
        ctx.save_for_forward(qdata, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        qdata, scale = ctx.saved_tensors
        return (grad * scale.to(grad.dtype)) @ qdata.to(grad.dtype), None, None

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor, qdata_t: Any, scale_t: Any) -> Any:
        qdata, scale = ctx.saved_tensors
        return (x_t @ qdata.t().to(x_t.dtype)) * scale.to(x_t.dtype)


def _int8(linear: torch.nn.Linear) -> Int8WeightOnlyLinear:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(linear, Int8WeightOnlyConfig())
    layer = Int8WeightOnlyLinear(
        linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta"
    )
    layer.weight, layer.bias = linear.weight, linear.bias
    return layer


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
