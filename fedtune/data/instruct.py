"""Instruction examples -> token rows whose loss is on the responses only.

Each example is rendered with the model's own chat template
(``tokenizer.apply_chat_template``). The characters of every assistant turn — from
where the template's generation prompt ends to where the turn (its end-of-turn token
included, so the model learns to stop) ends — are found by rendering the
conversation up to that turn with and without it; tokens whose characters fall there
keep their ids as labels, every other token (system, user, template markup, padding)
gets ``-100``, which :func:`fedtune.engines.loss.chunked_loss` and the models' own
losses leave out. Rows are padded one example each, or packed (``data.packing``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import torch

from fedtune.data.sources import Example
from fedtune.errors import DataError

T = TypeVar("T")

IGNORE = -100
"""The label of a token that carries no loss (PyTorch's and transformers' convention)."""


@dataclass(frozen=True)
class LabelledChunks:
    """Token rows with their own labels and attention mask: what engines and
    evaluation take in place of a plain ``(N, seq_len)`` tensor of token ids (whose
    labels are the ids themselves)."""

    input_ids: torch.Tensor
    """``(N, seq_len)`` int64 token ids."""
    labels: torch.Tensor
    """int64: ``(N, seq_len)`` the ids on response tokens, ``-100`` elsewhere (causal
    LM); ``(N,)`` a class per row (``seq-cls``); ``(N, target_len)`` target ids,
    ``-100`` on padding (``seq2seq``)."""
    attention_mask: torch.Tensor
    """``(N, seq_len)`` int64: 0 on padding."""
    aligned: bool = True
    """Labels are the inputs' next tokens, position by position (causal LM); False:
    a class or a separate target sequence per row (:mod:`fedtune.data.tasks`)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: Any) -> LabelledChunks:
        return LabelledChunks(
            self.input_ids[index], self.labels[index], self.attention_mask[index], self.aligned
        )


Tokens: TypeAlias = torch.Tensor | LabelledChunks
"""What engines train on: plain token chunks, or labelled (instruction) rows."""


def batch_parts(batch: Tokens) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` of a batch; padding columns that no row of
    the batch uses are cut off (padded rows cost only their longest member)."""
    if isinstance(batch, torch.Tensor):
        return batch, None, batch
    width = max(int(batch.attention_mask.sum(dim=1).max()), 2)
    labels = batch.labels
    if batch.aligned:
        labels = labels[:, :width]
    elif labels.dim() == 2:  # seq2seq targets: cut at the longest target of the batch
        used = (labels != IGNORE).any(dim=0).nonzero()
        # contiguous: T5's loss takes labels.view(-1)
        labels = labels[:, : int(used.max()) + 1 if len(used) else 1].contiguous()
    return batch.input_ids[:, :width], batch.attention_mask[:, :width], labels


def predicted_tokens(batch: Tokens) -> int:
    """Predictions of ``batch`` its loss averages over: tokens whose next-token loss
    counts (labels shifted by one), target tokens (seq2seq) or rows (seq-cls)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0] * (batch.shape[1] - 1))
    if not batch.aligned:
        return int((batch.labels != IGNORE).sum())
    return int((batch.labels[:, 1:] != IGNORE).sum())


def as_messages(turns: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """Chat turns as the ``[{"role", "content"}]`` list chat templates take."""
    return [{"role": role, "content": content} for role, content in turns]


def encode_example(tokenizer: Any, example: Example) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example: labels are ``-100`` outside assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"the tokenizer of this model ({type(tokenizer).__name__}) has no chat template: "
            "instruction data needs one (use an instruct model or a tokenizer that has one)"
        )
    messages = as_messages(example)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, (role, _) in enumerate(example):
        if role != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise DataError(
                "the model's chat template does not render a conversation as a growing "
                "prefix, so the response tokens cannot be found"
            )
        spans.append((len(before), len(upto)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(a <= start < b for a, b in spans) else IGNORE
        for token, (start, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def prompt_and_reference(tokenizer: Any, example: Example) -> tuple[list[int], str]:
    """The prompt ids of an example (up to the generation prompt of its last assistant
    turn) and that turn's text: what generation metrics compare against."""
    last = max(i for i, (role, _) in enumerate(example) if role == "assistant")
    text = tokenizer.apply_chat_template(
        as_messages(example[:last]), tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]), example[last][1]


def instruction_chunks(
    tokenizer: Any, examples: Sequence[Example], seq_len: int, packing: bool
) -> LabelledChunks:
    """Rows of ``seq_len`` tokens: one example per row, right-padded and truncated
    (``packing = False``), or the examples concatenated and cut (``True``). Examples
    left without a response token by truncation are dropped."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode_example(tokenizer, e) for e in examples]
    rows: list[tuple[list[int], list[int], list[int]]] = []
    if packing:
        ids = [t for e, _ in encoded for t in e]
        labels = [t for _, e in encoded for t in e]
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            rows.append(
                (ids[start : start + seq_len], labels[start : start + seq_len], [1] * seq_len)
            )
    else:
        for ids, labels in encoded:
            ids, labels = ids[:seq_len], labels[:seq_len]
            fill = seq_len - len(ids)
            rows.append((ids + [pad] * fill, labels + [IGNORE] * fill, [1] * len(ids) + [0] * fill))
    rows = [r for r in rows if any(t != IGNORE for t in r[1][1:])]
    if not rows:
        return LabelledChunks(*(torch.empty((0, seq_len), dtype=torch.long) for _ in range(3)))
    return LabelledChunks(*(torch.tensor([r[k] for r in rows], dtype=torch.long) for k in range(3)))


def split_examples(examples: tuple[T, ...], fraction: float) -> tuple[tuple[T, ...], tuple[T, ...]]:
    """(training examples, held-out tail): the tail holds ``fraction`` of them, at least
    one when ``fraction > 0`` and there are two or more."""
    if fraction <= 0 or len(examples) < 2:
        return examples, ()
    held = min(max(int(len(examples) * fraction), 1), len(examples) - 1)
    return examples[:-held], examples[-held:]
