"""Task types beyond the causal LM: an encoder's sequence classification, seq2seq.

``model.task`` picks the transformers auto class a folder loads with and PEFT's
matching ``task_type``; everything else — the engines, the strategies, the round loop —
is the same for every task, because every engine takes its loss from the model itself
(``model(input_ids, attention_mask, labels).loss``; only a causal LM's is computed in
slices, :mod:`fedtune.engines.loss`). What differs is the data (class ids, or target
sequences: :mod:`fedtune.data.tasks`) and the extra scores (accuracy).

A sequence-classification head does not exist in an encoder's checkpoint: its weights
are initialized from a fixed seed, identically in every process, and they train and
travel with the adapter (PEFT's ``modules_to_save`` for ``SEQ_CLS``), so the server's
copy is the one every client starts from.
"""

from __future__ import annotations

from typing import Any

from fedtune.tasks import CAUSAL_LM, SEQ2SEQ, SEQ_CLS

AUTO_CLASSES = {
    CAUSAL_LM: "AutoModelForCausalLM",
    SEQ_CLS: "AutoModelForSequenceClassification",
    SEQ2SEQ: "AutoModelForSeq2SeqLM",
}
"""``model.task`` -> the transformers auto class a folder loads with."""
PEFT_TASK_TYPES = {CAUSAL_LM: "CAUSAL_LM", SEQ_CLS: "SEQ_CLS", SEQ2SEQ: "SEQ_2_SEQ_LM"}
"""``model.task`` -> PEFT's ``task_type`` (which wraps the model and, for SEQ_CLS, trains
the classification head beside the LoRA weights)."""
HEAD_SEED = 0
"""Seed of a classification head's initial weights: the same in every process."""


def auto_class(task: str) -> Any:
    """The transformers auto class of ``task``."""
    import transformers

    return getattr(transformers, AUTO_CLASSES[task])


def task_of(model: Any) -> str:
    """The task a (PEFT-wrapped) transformers model was loaded for."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "is_encoder_decoder", False):
        return SEQ2SEQ
    if type(base).__name__.endswith("ForSequenceClassification"):
        return SEQ_CLS
    return CAUSAL_LM


def load_kwargs(task: str, num_labels: int) -> dict[str, Any]:
    """Extra ``from_pretrained``/config arguments of ``task``."""
    return {"num_labels": num_labels} if task == SEQ_CLS else {}


def head_keys(model: Any, missing: list[str]) -> list[str]:
    """The ``missing`` weights that belong to a task head the checkpoint cannot hold
    (anything outside the base model, and the base model's pooler, which only
    classification heads use); the others are a checkpoint's real gaps."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    return [k for k in missing if not k.startswith(prefix) or ".pooler." in k]


def init_head(model: Any, keys: list[str]) -> None:
    """Initialize the weights ``keys`` of ``model`` from :data:`HEAD_SEED`, as
    transformers' ``_init_weights`` would (normal(0, initializer_range) matrices, zero
    biases, unit norms) but seeded, so every process builds the same head."""
    import torch

    std = float(getattr(model.config, "initializer_range", 0.02))
    params = dict(model.named_parameters())
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(HEAD_SEED)
        for key in sorted(keys):
            weight = params.get(key)
            if weight is None:
                continue
            if key.endswith("bias"):
                weight.zero_()
            elif weight.dim() >= 2:
                weight.normal_(0.0, std)
            else:
                weight.fill_(1.0)
