"""The federation's population: training clients, the global evaluation set, chunks.

The split does not depend on the run seed: runs with different seeds (or strategies)
train on the same clients and are scored on the same held-out text, so their
perplexities compare. Clients set aside for evaluation never train.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from fedtune.config import DataConfig
from fedtune.data.instruct import (
    Tokens,
    instruction_chunks,
    prompt_and_reference,
    split_examples,
)
from fedtune.data.partition import SPLIT_SEED, partition_rows
from fedtune.data.sources import ClientText, load_jsonl, load_shakespeare
from fedtune.data.tasks import task_items, task_rows
from fedtune.errors import DataError
from fedtune.tasks import CAUSAL_LM

T = TypeVar("T")


@dataclass(frozen=True)
class Population:
    """Training clients (index = client index = Flower partition id) and eval clients."""

    train: tuple[ClientText, ...]
    evaluation: tuple[ClientText, ...]


@functools.lru_cache(maxsize=4)
def build_population(cfg: DataConfig) -> Population:
    """Load the source named by ``cfg``, filter it, and split train from evaluation.

    Row sources (``files``, ``chatterbot``) become clients through the partitioner
    (:mod:`fedtune.data.partition`); with ``data.eval_fraction`` their held-out rows
    are the evaluation set and every kept partition trains.
    """
    held_out = None
    if cfg.name in ("files", "chatterbot"):
        parts = partition_rows(cfg)
        texts, held_out = list(parts.clients), parts.held_out
    else:
        texts = load_shakespeare() if cfg.name == "shakespeare" else load_jsonl(cfg.path)
    kept = [c for c in texts if len(c.text) >= cfg.min_chars]
    if held_out is not None:
        if not kept:
            raise DataError(f"no client has data.min_chars >= {cfg.min_chars} characters: lower it")
        return Population(train=tuple(kept), evaluation=(held_out,))
    if len(kept) <= cfg.eval_clients:
        raise DataError(
            f"only {len(kept)} of {len(texts)} clients have data.min_chars >= {cfg.min_chars}; "
            f"need more than data.eval_clients = {cfg.eval_clients}: lower data.min_chars "
            "or data.eval_clients"
        )
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(kept))
    evaluation = sorted((kept[i] for i in order[: cfg.eval_clients]), key=lambda c: c.client_id)
    rest = [kept[i] for i in order[cfg.eval_clients :]]
    if cfg.num_clients:
        if cfg.num_clients > len(rest):
            raise DataError(
                f"data.num_clients = {cfg.num_clients} but only {len(rest)} training clients "
                f"have at least {cfg.min_chars} characters: lower data.num_clients or "
                "data.min_chars"
            )
        rest = rest[: cfg.num_clients]
    train = sorted(rest, key=lambda c: c.client_id)
    return Population(train=tuple(train), evaluation=tuple(evaluation))


def split_holdout(text: str, fraction: float) -> tuple[str, str]:
    """Split ``text`` into (train, held-out tail) at a line boundary."""
    if fraction <= 0:
        return text, ""
    cut = int(len(text) * (1.0 - fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def leading_special(tokenizer: Any) -> list[int]:
    """The token(s) the tokenizer puts before any text: ``[<bos>]`` for Gemma, whose
    outputs go astray on a sequence without it; none for SmolLM2."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    at = full.index(plain[0]) if plain and plain[0] in full else 0
    return list(full[:at])


def chunk_tokens(tokenizer: Any, text: str, seq_len: int) -> torch.Tensor:
    """Tokenize ``text`` and cut it into non-overlapping ``seq_len`` chunks (int64).

    Every chunk starts with the tokenizer's own leading special tokens
    (:func:`leading_special`), as a sequence the model saw in training did."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = leading_special(tokenizer)
    body = seq_len - len(prefix)
    n = len(ids) // body if body > 0 else 0
    if n == 0:
        return torch.empty((0, seq_len), dtype=torch.long)
    rows = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if prefix:
        rows = torch.cat([torch.tensor([prefix] * n, dtype=torch.long), rows], dim=1)
    return rows


def client_train_chunks(
    tokenizer: Any, client: ClientText, cfg: DataConfig, seq_len: int, task: str = CAUSAL_LM
) -> Tokens:
    """A training client's chunks (its held-out tail excluded); error if it has none.

    Instruction data gives :class:`LabelledChunks` (loss on responses only), as do the
    tasks beyond the causal LM (``model.task``; :mod:`fedtune.data.tasks`)."""
    chunks: Tokens
    if task != CAUSAL_LM:
        train_rows, _ = split_examples(task_items(client, task), cfg.local_holdout)
        return task_rows(tokenizer, train_rows, cfg, seq_len, task, f"client {client.client_id!r}")
    if cfg.instruction:
        train, _ = split_examples(client.examples, cfg.local_holdout)
        chunks = instruction_chunks(tokenizer, train, seq_len, cfg.packing)
    else:
        train_text, _ = split_holdout(client.text, cfg.local_holdout)
        chunks = chunk_tokens(tokenizer, train_text, seq_len)
    if len(chunks) == 0:
        if cfg.instruction:
            raise DataError(
                f"client {client.client_id!r} has no example with a response token within "
                f"client.seq_len = {seq_len}: raise client.seq_len or data.min_chars"
            )
        raise DataError(
            f"client {client.client_id!r} has fewer than client.seq_len = {seq_len} tokens "
            f"to train on: raise data.min_chars or lower client.seq_len"
        )
    return chunks


def client_holdout_chunks(
    tokenizer: Any, client: ClientText, cfg: DataConfig, seq_len: int, task: str = CAUSAL_LM
) -> Tokens:
    """A training client's own held-out tail (``data.local_holdout``), tokenized as its
    training part is: what per-client evaluation scores. May be empty."""
    if task != CAUSAL_LM:
        _, held_rows = split_examples(task_items(client, task), cfg.local_holdout)
        return task_rows(tokenizer, held_rows, cfg, seq_len, task)
    if cfg.instruction:
        _, held = split_examples(client.examples, cfg.local_holdout)
        return instruction_chunks(tokenizer, held, seq_len, packing=False)
    return chunk_tokens(tokenizer, split_holdout(client.text, cfg.local_holdout)[1], seq_len)


def interleaved(per_client: Sequence[tuple[T, ...]], count: int) -> list[T]:
    """The first ``count`` examples taken round-robin across clients."""
    picked: list[T] = []
    for depth in range(max((len(c) for c in per_client), default=0)):
        picked.extend(c[depth] for c in per_client if depth < len(c))
        if len(picked) >= count:
            break
    return picked[:count]


def generation_examples(
    tokenizer: Any, population: Population, count: int
) -> list[tuple[list[int], str]]:
    """``(prompt ids, reference answer)`` of up to ``count`` evaluation examples,
    round-robin across the evaluation clients (the generation metrics' questions)."""
    examples = interleaved([c.examples for c in population.evaluation], count)
    return [prompt_and_reference(tokenizer, e) for e in examples]


def eval_chunks(
    tokenizer: Any, population: Population, cfg: DataConfig, seq_len: int, task: str = CAUSAL_LM
) -> Tokens:
    """The global held-out set: chunks interleaved across eval clients, first N kept
    (instruction data, and the tasks beyond the causal LM: the first N examples,
    round-robin, one a row)."""
    if task != CAUSAL_LM:
        items = interleaved([task_items(c, task) for c in population.evaluation], cfg.eval_chunks)
        return task_rows(tokenizer, items, cfg, seq_len, task, "the evaluation set")
    if cfg.instruction:
        examples = interleaved([c.examples for c in population.evaluation], cfg.eval_chunks)
        labelled = instruction_chunks(tokenizer, examples, seq_len, packing=False)
        if len(labelled) == 0:
            raise DataError(
                "the evaluation set has no response token within client.seq_len = "
                f"{seq_len}: raise client.seq_len"
            )
        return labelled
    per_client = [chunk_tokens(tokenizer, c.text, seq_len) for c in population.evaluation]
    picked: list[torch.Tensor] = []
    depth = max((len(c) for c in per_client), default=0)
    for i in range(depth):
        picked.extend(c[i] for c in per_client if i < len(c))
        if len(picked) >= cfg.eval_chunks:
            break
    if not picked:
        raise DataError(
            f"the evaluation clients hold fewer than client.seq_len = {seq_len} tokens: "
            "raise data.min_chars or lower client.seq_len"
        )
    return torch.stack(picked[: cfg.eval_chunks])
