"""LoRA adapters through PEFT: attach, read and write the adapter state, save it.

Only the adapter travels: :func:`adapter_state` returns PEFT's own adapter state dict
(names without the adapter name, fp32, contiguous), which
:func:`load_adapter_state` puts back exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedtune.config import LoraConfig, ModelConfig
from fedtune.errors import ConfigError
from fedtune.metrics import atomic_directory

AdapterState = dict[str, torch.Tensor]


def load_lora_model(model: ModelConfig, lora: LoraConfig, seed: int, rank: int = 0) -> Any:
    """``[model]``'s base, loaded as every fedtune process loads it, with ``[lora]``'s
    adapter attached (:func:`attach_lora`)."""
    from fedtune.models.base import load_base_model

    base = load_base_model(
        model.name,
        model.compute_dtype,
        model.num_layers,
        model.quantization,
        trust_remote_code=model.trust_remote_code,
        task=model.task,
        num_labels=model.num_labels,
    )
    return attach_lora(base, lora, seed=seed, rank=rank)


def attach_lora(base: Any, lora: LoraConfig, seed: int, rank: int = 0) -> Any:
    """Wrap ``base`` in a PEFT LoRA model; the LoRA init is seeded by ``seed``.

    ``lora.targets`` names the wrapped modules; empty, the architecture's defaults from
    PEFT's per-model mapping (:mod:`fedtune.models.targets`).

    ``rank`` (0: ``lora.r``) gives a device tier its own rank; alpha scales with it so
    that the adapter's scale ``alpha / r`` — and so the meaning of ``B @ A`` — is the
    same at every rank.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from fedtune.models.targets import resolve_targets
    from fedtune.models.tasks import PEFT_TASK_TYPES, task_of

    targets = resolve_targets(base, tuple(lora.targets))  # empty: the architecture's defaults
    r = rank or lora.r
    config = PeftLoraConfig(
        r=r,
        lora_alpha=lora.alpha * r / lora.r,
        lora_dropout=lora.dropout,
        target_modules=list(targets),
        # SEQ_CLS also trains (and saves) the classification head: PEFT's modules_to_save.
        task_type=PEFT_TASK_TYPES[task_of(base)],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
    return model


def adapter_state(model: Any) -> AdapterState:
    """The adapter's weights as fp32 CPU tensors, in a stable (sorted) order."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {
        k: state[k].detach().to("cpu", torch.float32).contiguous().clone() for k in sorted(state)
    }


def state_name(model: Any, parameter: str) -> str:
    """A trained parameter's name in :func:`adapter_state` (PEFT's name without the
    adapter's, and a task head's without ``modules_to_save``): the names seed
    perturbations are laid out by."""
    return parameter.replace(f".{model.active_adapter}.", ".").replace(".modules_to_save.", ".")


HEAD_MARKER = "modules_to_save"
"""In a parameter's name: a PEFT-trained copy of a whole module (a classification head)."""


def is_adapter(name: str) -> bool:
    """Whether a parameter (or adapter-state key) travels with the adapter: a LoRA factor,
    or a task head PEFT trains whole (``seq-cls``)."""
    return "lora_" in name or HEAD_MARKER in name


def trained(name: str, train_only: str = "all") -> bool:
    """Whether an engine trains parameter ``name`` under ``train_only``: every LoRA factor
    and a task head (``all``), or only LoRA ``A`` or ``B`` (a task head then stays as
    sent, as the other factor does)."""
    if train_only == "all":
        return is_adapter(name)
    return f"lora_{train_only}" in name


def load_adapter_state(model: Any, state: AdapterState) -> None:
    """Overwrite the model's adapter with ``state`` (names as from :func:`adapter_state`)."""
    from peft import set_peft_model_state_dict

    dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" in n)
    result = set_peft_model_state_dict(model, {k: v.to(dtype) for k, v in state.items()})
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter has keys the model does not: {unexpected[:3]}")


def save_adapter(
    model: Any,
    state: AdapterState,
    out_dir: Path,
    base_name: str | None = None,
    card: str | None = None,
) -> Path:
    """Write ``state`` as a PEFT adapter folder, atomically (temp folder, then rename).

    ``base_name`` replaces PEFT's ``base_model_name_or_path`` (a local cache folder
    otherwise) with the name others load the base by, a Hub id; ``card`` is written as
    the folder's ``README.md`` (its model card).
    """
    import json

    load_adapter_state(model, state)
    with atomic_directory(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if base_name is not None:
            config_path = Path(tmp) / "adapter_config.json"
            config = json.loads(config_path.read_text())
            config["base_model_name_or_path"] = base_name
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if card is not None:
            (Path(tmp) / "README.md").write_text(card)
    return Path(out_dir)


def reset_adapter(model: Any, seed: int) -> None:
    """Re-initialise the adapter as PEFT does (B = 0, A random), seeded by ``seed``."""
    from peft.tuners.lora import LoraLayer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, module in sorted(model.named_modules(), key=lambda item: item[0]):
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    module.reset_lora_parameters(name, init_lora_weights=True)


@contextlib.contextmanager
def merged_into_base(model: Any, state: AdapterState, scale: float) -> Iterator[None]:
    """Add ``scale * B @ A`` of ``state`` to the base weights of its modules; put the
    weights back on exit (copies, not a subtraction, so nothing drifts).

    Needs plain floating-point base weights: a quantized base cannot take an exact
    dense update (a :class:`ConfigError` says so).
    """
    modules = dict(model.named_modules())
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for key in sorted(k for k in state if ".lora_A" in k):
            path = key.split(".lora_A")[0]
            base = getattr(modules.get(path), "base_layer", None)
            weight = getattr(base, "weight", None)
            if weight is None or type(weight.data) is not torch.Tensor:
                raise ConfigError(
                    f"cannot merge the global adapter into {path}: its base weight is not a "
                    "plain tensor (a quantized base?); strategies that merge (flora) need "
                    "model.quantization = 'none'"
                )
            b = state[key.replace(".lora_A", ".lora_B")]
            saved.append((weight, weight.detach().clone()))
            with torch.no_grad():
                weight += (scale * (b.double() @ state[key].double())).to(weight.dtype)
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)
