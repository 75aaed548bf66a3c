"""Base models, quantization and LoRA adapters."""

from fedtune.models.base import (
    cache_dir,
    known_model_names,
    load_base_model,
    load_tokenizer,
    model_dir,
)
from fedtune.models.lora import (
    AdapterState,
    adapter_state,
    attach_lora,
    load_adapter_state,
    load_lora_model,
    merged_into_base,
    reset_adapter,
    save_adapter,
)
from fedtune.models.quantization import QUANTIZATIONS, quantize_base

__all__ = [
    "AdapterState",
    "QUANTIZATIONS",
    "adapter_state",
    "attach_lora",
    "cache_dir",
    "known_model_names",
    "load_adapter_state",
    "load_base_model",
    "load_lora_model",
    "load_tokenizer",
    "merged_into_base",
    "model_dir",
    "quantize_base",
    "reset_adapter",
    "save_adapter",
]
