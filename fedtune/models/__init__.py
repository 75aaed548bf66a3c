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
    save_adapter,
)

__all__ = [
    "AdapterState",
    "adapter_state",
    "attach_lora",
    "cache_dir",
    "known_model_names",
    "load_adapter_state",
    "load_base_model",
    "load_tokenizer",
    "model_dir",
    "save_adapter",
]
