"""Rows for the tasks beyond the causal LM (``model.task``; :mod:`fedtune.models.tasks`).

- ``seq-cls``: each row of ``data.text_column`` becomes one input (the tokenizer's own
  special tokens, ``[CLS] ... [SEP]`` for BERT, truncated to ``client.seq_len``) and its
  ``data.label_column`` value one class id (:func:`label_ids`);
- ``seq2seq``: each prompt (after ``data.system_prompt``, if any) becomes the encoder's
  input and its response the target sequence, ``-100`` on the target's padding.

Both give :class:`~fedtune.data.instruct.LabelledChunks` with ``aligned = False``; the
engines pass its labels to the model, whose own loss takes them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from fedtune.config import DataConfig
from fedtune.data.instruct import IGNORE, LabelledChunks
from fedtune.data.rows import load_rows
from fedtune.data.sources import ClientText, Example
from fedtune.errors import ConfigError, DataError
from fedtune.tasks import SEQ_CLS

Pair = tuple[str, str]
"""A classification row: (text, label value as a string)."""


@functools.lru_cache(maxsize=4)
def label_ids(cfg: DataConfig) -> dict[str, int]:
    """Label value -> class id, from the training table's ``data.label_column``:
    integer labels are their own ids; any other values are numbered in sorted order.
    Every process reads the same table, so every process numbers them alike."""
    values = sorted({str(v) for v in load_rows(cfg)[cfg.label_column] if v is not None})
    if values and all(v.lstrip("-").isdigit() for v in values):
        ids = {v: int(v) for v in values}
        if min(ids.values()) < 0:
            raise DataError(
                f"data.label_column = {cfg.label_column!r} holds negative class ids: integer "
                "labels must be 0, 1, ..."
            )
        return ids
    return {v: i for i, v in enumerate(values)}


def num_classes(cfg: DataConfig) -> int:
    """Classes ``model.num_labels`` must hold: the largest class id plus one."""
    return max(label_ids(cfg).values(), default=-1) + 1


def task_items(client: ClientText, task: str) -> tuple[Pair, ...] | tuple[Example, ...]:
    """What a client holds for ``task``: classification pairs or prompt/response examples."""
    return client.pairs if task == SEQ_CLS else client.examples


def task_rows(
    tokenizer: Any,
    items: Sequence[Any],
    cfg: DataConfig,
    seq_len: int,
    task: str,
    owner: str = "",
) -> LabelledChunks:
    """``items`` (of :func:`task_items`) as rows of ``task``; with ``owner`` (who holds
    them, for the message), no row at all is an error."""
    if task == SEQ_CLS:
        rows = classification_rows(tokenizer, items, seq_len, label_ids(cfg), cfg.label_column)
    else:
        rows = seq2seq_rows(tokenizer, items, seq_len)
    if owner and len(rows) == 0:
        raise DataError(
            f"{owner} has no row for model.task = {task!r} (empty texts, prompts or "
            "responses): check the data.*_column keys and data.local_holdout"
        )
    return rows


def _padded(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


def _encode(tokenizer: Any, text: str, seq_len: int) -> list[int]:
    return list(tokenizer(text, truncation=True, max_length=seq_len)["input_ids"])


def _empty(seq_len: int, label_shape: tuple[int, ...]) -> LabelledChunks:
    empty = torch.empty((0, seq_len), dtype=torch.long)
    return LabelledChunks(empty, torch.empty(label_shape, dtype=torch.long), empty, aligned=False)


def classification_rows(
    tokenizer: Any, pairs: Sequence[Pair], seq_len: int, ids: dict[str, int], column: str
) -> LabelledChunks:
    """One row per (text, label): input ids right-padded to ``seq_len``, labels ``(N,)``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inputs, labels = [], []
    for text, label in pairs:
        if label not in ids:
            raise DataError(
                f"label {label!r} (data.label_column = {column!r}) is not among the training "
                f"rows' labels ({', '.join(list(ids)[:8])}...)"
            )
        encoded = _encode(tokenizer, text, seq_len)
        if encoded:
            inputs.append(encoded)
            labels.append(ids[label])
    if not inputs:
        return _empty(seq_len, (0,))
    mask = [[1] * len(r) for r in inputs]
    return LabelledChunks(
        _padded(inputs, seq_len, pad),
        torch.tensor(labels, dtype=torch.long),
        _padded(mask, seq_len, 0),
        aligned=False,
    )


def seq2seq_rows(tokenizer: Any, examples: Sequence[Example], seq_len: int) -> LabelledChunks:
    """One row per example: the prompt (system turn first) as encoder input, the last
    assistant turn as target, both truncated to ``seq_len`` and right-padded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sources, targets = [], []
    for example in examples:
        prompt = "\n".join(content for role, content in example[:-1] if content)
        source, target = (
            _encode(tokenizer, prompt, seq_len),
            _encode(tokenizer, example[-1][1], seq_len),
        )
        if source and target:
            sources.append(source)
            targets.append(target)
    if not sources:
        return _empty(seq_len, (0, seq_len))
    mask = [[1] * len(r) for r in sources]
    return LabelledChunks(
        _padded(sources, seq_len, pad),
        _padded(targets, seq_len, IGNORE),
        _padded(mask, seq_len, 0),
        aligned=False,
    )


def check_num_labels(cfg: DataConfig, num_labels: int) -> None:
    """Refuse a classification head too small for the data's classes (preflight)."""
    needed = num_classes(cfg)
    if needed > num_labels:
        raise ConfigError(
            f"data.label_column = {cfg.label_column!r} has class ids up to {needed - 1}: set "
            f"model.num_labels = {needed} (it is {num_labels})"
        )
