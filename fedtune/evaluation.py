"""Held-out perplexity of a causal LM on token chunks."""

from __future__ import annotations

import math
from typing import Any

import torch


@torch.inference_mode()
def perplexity(model: Any, chunks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every predicted token of ``chunks``.

    All chunks have the same length, so each batch's mean loss is weighted by its
    number of predicted tokens to get the exact token mean.
    """
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start : start + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        count = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * count
        tokens += count
    if was_training:
        model.train()
    return math.exp(total / tokens)
