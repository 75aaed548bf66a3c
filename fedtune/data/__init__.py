"""Client text sources, the population split, and tokenization into chunks."""

from fedtune.data.population import (
    Population,
    build_population,
    chunk_tokens,
    client_train_chunks,
    eval_chunks,
    split_holdout,
)
from fedtune.data.sources import ClientText, load_jsonl, load_shakespeare, parse_play

__all__ = [
    "ClientText",
    "Population",
    "build_population",
    "chunk_tokens",
    "client_train_chunks",
    "eval_chunks",
    "load_jsonl",
    "load_shakespeare",
    "parse_play",
    "split_holdout",
]
