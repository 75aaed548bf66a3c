"""The causal-LM loss without the whole vocabulary's logits at once (other tasks take
the model's own loss, :func:`causal_lm_loss`).

For 4x128 tokens and a 49,152-word vocabulary the logits are 100 MB in fp32, and a
backward pass keeps them (or their log-softmax) plus their gradient: on a small model
that is the largest single item of a training step's memory. The loss only needs, per
token, the log-sum-exp of its logits and the logit of its label, so it is computed
over the tokens in ``chunks`` slices and summed; during backprop each slice's logits
are recomputed from the (small) hidden states instead of being kept
(``torch.utils.checkpoint``). The result equals the model's own mean cross-entropy
over the shifted labels (``-100`` ignored).
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100
LOSS_CHUNKS = 8
"""Slices of the tokens: peak logits memory is 1/LOSS_CHUNKS of the full tensor."""


def decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The decoder stack and the LM head of a (PEFT-wrapped) causal LM, or None when
    its logits are not a plain linear map of the last hidden state (soft-capping,
    scaling), where only the model's own loss is right."""
    from fedtune.models.tasks import CAUSAL_LM, task_of

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(causal, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    if task_of(causal) != CAUSAL_LM:  # an encoder's classifier, a seq2seq decoder
        return None
    get_decoder = getattr(causal, "get_decoder", None)
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or head is None or decoder is causal:
        return None
    return decoder, head


def _slice_loss(head: Any, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # A tensor ``head`` is the transposed head weight, taken once for every slice: an
    # exported graph then holds one transposed copy instead of one per slice.
    logits = (hidden @ head if isinstance(head, torch.Tensor) else head(hidden)).float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def chunked_loss(
    head: Any,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunks: int = LOSS_CHUNKS,
    recompute: bool = True,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``labels`` shifted by one.

    ``hidden`` is ``(batch, seq, d)``, ``labels`` ``(batch, seq)``. ``recompute``
    recomputes each slice's logits in the backward pass (torch autograd); an ONNX
    export traces with ``recompute=False`` (its graph is rewritten instead)."""
    flat = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    if not recompute and isinstance(head, torch.nn.Linear) and head.bias is None:
        head = head.weight.t()
    n = flat.shape[0]  # a traced value under ONNX export: the slices follow the input
    for i in range(chunks):
        # Slices with computed bounds, not chunk/tensor_split: those export as
        # SplitToSequence/SequenceAt, which ONNX Runtime training cannot differentiate.
        start, end = n * i // chunks, n * (i + 1) // chunks
        h, y = flat[start:end], targets[start:end]
        if recompute and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            total = total + checkpoint(_slice_loss, head, h, y, use_reentrant=False)
        else:
            total = total + _slice_loss(head, h, y)
    count = (targets != IGNORE).sum().clamp(min=1)
    return total / count


def causal_lm_loss(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    chunks: int = LOSS_CHUNKS,
    recompute: bool = True,
) -> torch.Tensor:
    """The model's training loss: a causal LM's through :func:`chunked_loss`; the
    model's own loss when its head is not a plain linear map, and for the other tasks
    (``model.task``: a classifier's cross-entropy over classes, a seq2seq model's over
    its target tokens), whose logits are small or need the encoder's output."""
    parts = decoder_and_head(model)
    if parts is None or chunks <= 1:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return chunked_loss(head, hidden, labels, chunks, recompute)
