"""LoRA adapters through PEFT: attach, read and write the adapter state, save it.

Only the adapter travels: :func:`adapter_state` returns PEFT's own adapter state dict
(names without the adapter name, fp32, contiguous), which
:func:`load_adapter_state` puts back exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedtune.config import LoraConfig
from fedtune.errors import ConfigError
from fedtune.metrics import atomic_directory

AdapterState = dict[str, torch.Tensor]


def attach_lora(base: Any, lora: LoraConfig, seed: int) -> Any:
    """Wrap ``base`` in a PEFT LoRA model; the LoRA init is seeded by ``seed``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    missing = [t for t in lora.targets if t not in names]
    if missing:
        raise ConfigError(
            f"'lora.targets' names modules the model does not have: {missing} "
            f"(linear layers of this model include: {_linear_names(base)})"
        )
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
    return model


def _linear_names(model: Any) -> str:
    names = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )
    return ", ".join(names)


def adapter_state(model: Any) -> AdapterState:
    """The adapter's weights as fp32 CPU tensors, in a stable (sorted) order."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {
        k: state[k].detach().to("cpu", torch.float32).contiguous().clone() for k in sorted(state)
    }


def load_adapter_state(model: Any, state: AdapterState) -> None:
    """Overwrite the model's adapter with ``state`` (names as from :func:`adapter_state`)."""
    from peft import set_peft_model_state_dict

    dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" in n)
    result = set_peft_model_state_dict(model, {k: v.to(dtype) for k, v in state.items()})
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter has keys the model does not: {unexpected[:3]}")


def save_adapter(model: Any, state: AdapterState, out_dir: Path) -> Path:
    """Write ``state`` as a PEFT adapter folder, atomically (temp folder, then rename)."""
    load_adapter_state(model, state)
    with atomic_directory(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)
