"""Held-out perplexity of a causal LM on token chunks or labelled rows."""

from __future__ import annotations

import math
from typing import Any

import torch

from fedtune.data.instruct import Tokens, batch_parts, predicted_tokens


@torch.inference_mode()
def perplexity(model: Any, chunks: Tokens, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every predicted token of ``chunks``.

    Each batch's mean loss is weighted by its number of predicted tokens to get the
    exact token mean; for labelled rows (instruction data) only response tokens count.
    """
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start : start + batch_size]
        input_ids, attention_mask, labels = batch_parts(batch)
        count = predicted_tokens(batch)
        if count == 0:
            continue
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        total += float(loss) * count
        tokens += count
    if was_training:
        model.train()
    return math.exp(total / tokens) if tokens else math.nan
