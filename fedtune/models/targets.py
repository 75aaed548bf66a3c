"""Which modules get LoRA: PEFT's per-architecture table, checked before a run starts.

The default targets of an architecture come from PEFT's own mapping
(``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, keyed by ``config.model_type``)
so that fedtune follows PEFT as it learns new models; :data:`FEDTUNE_TARGETS` only
fills the architectures PEFT's table lacks. ``lora.targets`` overrides both.

:func:`check_lora_targets` builds the model's module tree on the ``meta`` device (no
weights, well under a second) so that a wrong target is refused in the launching
process, before Ray or a SuperLink starts.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fedtune.errors import ConfigError

# Architectures that PEFT 0.21's mapping lacks, with the attention projections PEFT's
# own convention (query and value) picks for them. Fused projections are taken whole:
# LoRA on a fused q/k/v layer adapts all three, as PEFT's entries for gpt2/bloom do.
FEDTUNE_TARGETS: dict[str, tuple[str, ...]] = {
    "phi3": ("qkv_proj",),
    "smollm3": ("q_proj", "v_proj"),
    "ministral": ("q_proj", "v_proj"),
    "olmo": ("q_proj", "v_proj"),
    "olmo2": ("q_proj", "v_proj"),
    "olmoe": ("q_proj", "v_proj"),
    "bitnet": ("q_proj", "v_proj"),
    "mobilebert": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "xglm": ("q_proj", "v_proj"),
}

# Module names that project to queries, keys and values (or gate and up) at once.
FUSED_NAMES = frozenset(
    {"qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "W_pack", "gate_up_proj"}
)


def default_targets_for(model_type: str) -> tuple[str, ...]:
    """The LoRA targets of an architecture (``config.model_type``): PEFT's, else ours."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    peft_targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if peft_targets:
        return tuple(peft_targets)
    if model_type in FEDTUNE_TARGETS:
        return FEDTUNE_TARGETS[model_type]
    raise ConfigError(
        f"no default LoRA targets for model type {model_type!r} (neither PEFT's mapping "
        "nor fedtune's has it): set 'lora.targets' in the scenario's [lora] section"
    )


def resolve_targets(model: Any, targets: tuple[str, ...]) -> tuple[str, ...]:
    """``targets`` if given, else the defaults of ``model``'s architecture; every name
    must be a module of ``model`` that PEFT's LoRA can wrap (else one clear error)."""
    chosen = tuple(targets) or _defaults_of(model)
    adaptable = adaptable_modules(model)
    # Quantized layers (HQQ's) are not nn.Linear but PEFT wraps them: any leaf counts.
    leaves = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if not any(m.children())}
    missing = [t for t in chosen if t not in adaptable and t not in leaves]
    if missing:
        kind = model.config.model_type
        where = "'lora.targets'" if targets else f"the default targets of {kind!r}"
        raise ConfigError(
            f"{where} names modules this model does not have (or LoRA cannot wrap): "
            f"{missing}; set 'lora.targets' in [lora] to some of the layers of this model: "
            f"{describe_modules(adaptable)}"
        )
    return chosen


def _defaults_of(model: Any) -> tuple[str, ...]:
    """Defaults by ``model_type``; for a class PEFT cannot know (remote code), those of
    the transformers class it extends, else PEFT's most common entry (``q_proj``,
    ``v_proj``) when the model has both."""
    try:
        return default_targets_for(model.config.model_type)
    except ConfigError:
        for cls in type(model).__mro__[1:]:
            parent = getattr(getattr(cls, "config_class", None), "model_type", "")
            if parent and parent != model.config.model_type:
                with contextlib.suppress(ConfigError):
                    return default_targets_for(parent)
        leaves = {p.rsplit(".", 1)[-1] for p, _ in model.named_modules()}
        if {"q_proj", "v_proj"} <= leaves:
            return ("q_proj", "v_proj")
        raise


def adaptable_modules(model: Any) -> dict[str, str]:
    """Leaf names of the layers PEFT's LoRA can wrap, with their kind (``Linear``,
    ``Conv1D`` for GPT-2-style layers, ``Embedding``); ``lm_head`` is left out."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = ((Conv1D, "Conv1D"), (torch.nn.Linear, "Linear"), (torch.nn.Embedding, "Embedding"))
    found: dict[str, str] = {}
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if not path or leaf == "lm_head":
            continue
        for cls, kind in kinds:
            if isinstance(module, cls):
                found.setdefault(leaf, kind)
                break
    return found


def describe_modules(found: dict[str, str]) -> str:
    """``c_attn (Conv1D, fused q/k/v), c_fc (Conv1D), ...`` for an error message."""
    parts = []
    for name in sorted(found):
        kind = found[name]
        if name in FUSED_NAMES:
            kind += ", fused " + ("gate/up" if name == "gate_up_proj" else "q/k/v")
        parts.append(f"{name} ({kind})")
    return ", ".join(parts)


def meta_model(model_cfg: Any) -> Any:
    """``model_cfg.name``'s architecture on the ``meta`` device: its modules, no weights."""
    import torch
    import transformers

    from fedtune.models.base import TINY, model_dir
    from fedtune.models.families import check_remote_code
    from fedtune.models.tasks import auto_class, load_kwargs

    if model_cfg.name in TINY:
        spec = TINY[model_cfg.name]
        config = getattr(transformers, spec.config_cls)(**spec.kwargs)
        remote = False
    else:
        folder = model_dir(model_cfg.name)
        assert folder is not None  # only tiny models have none, handled above
        remote = check_remote_code(folder, model_cfg.trust_remote_code)
        config = transformers.AutoConfig.from_pretrained(
            folder, trust_remote_code=remote, **load_kwargs(model_cfg.task, model_cfg.num_labels)
        )
    if model_cfg.num_layers:
        config.num_hidden_layers = model_cfg.num_layers
    with torch.device("meta"):
        return auto_class(model_cfg.task).from_config(config, trust_remote_code=remote)


def check_lora_targets(model_cfg: Any, lora_cfg: Any) -> tuple[str, ...]:
    """Refuse targets the model does not have, before any process loads weights;
    return the targets a run will use."""
    return resolve_targets(meta_model(model_cfg), tuple(lora_cfg.targets))
