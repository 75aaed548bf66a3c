"""The federation's population: training clients, the global evaluation set, chunks.

The split does not depend on the run seed: runs with different seeds (or strategies)
train on the same clients and are scored on the same held-out text, so their
perplexities compare. Clients set aside for evaluation never train.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedtune.config import DataConfig
from fedtune.data.sources import ClientText, load_jsonl, load_shakespeare
from fedtune.errors import DataError

SPLIT_SEED = 20240611
"""Fixed seed of the population split (see the module docstring)."""


@dataclass(frozen=True)
class Population:
    """Training clients (index = client index = Flower partition id) and eval clients."""

    train: tuple[ClientText, ...]
    evaluation: tuple[ClientText, ...]


@functools.lru_cache(maxsize=4)
def build_population(cfg: DataConfig) -> Population:
    """Load the source named by ``cfg``, filter it, and split train from evaluation."""
    texts = load_shakespeare() if cfg.name == "shakespeare" else load_jsonl(cfg.path)
    kept = [c for c in texts if len(c.text) >= cfg.min_chars]
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


def chunk_tokens(tokenizer: Any, text: str, seq_len: int) -> torch.Tensor:
    """Tokenize ``text`` and cut it into non-overlapping ``seq_len`` chunks (int64)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        return torch.empty((0, seq_len), dtype=torch.long)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def client_train_chunks(
    tokenizer: Any, client: ClientText, cfg: DataConfig, seq_len: int
) -> torch.Tensor:
    """A training client's chunks (its held-out tail excluded); error if it has none."""
    train_text, _ = split_holdout(client.text, cfg.local_holdout)
    chunks = chunk_tokens(tokenizer, train_text, seq_len)
    if len(chunks) == 0:
        raise DataError(
            f"client {client.client_id!r} has fewer than client.seq_len = {seq_len} tokens "
            f"to train on: raise data.min_chars or lower client.seq_len"
        )
    return chunks


def eval_chunks(
    tokenizer: Any, population: Population, cfg: DataConfig, seq_len: int
) -> torch.Tensor:
    """The global held-out set: chunks interleaved across eval clients, first N kept."""
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
