"""Client text sources, the population split, and tokenization into chunks."""

from fedtune.data.instruct import LabelledChunks, Tokens, batch_parts
from fedtune.data.population import (
    Population,
    build_population,
    chunk_tokens,
    client_holdout_chunks,
    client_train_chunks,
    eval_chunks,
    generation_examples,
    split_holdout,
)
from fedtune.data.sources import ClientText, load_jsonl, load_shakespeare, parse_play

__all__ = [
    "ClientText",
    "LabelledChunks",
    "Population",
    "Tokens",
    "batch_parts",
    "build_population",
    "chunk_tokens",
    "client_holdout_chunks",
    "client_train_chunks",
    "eval_chunks",
    "generation_examples",
    "load_jsonl",
    "load_shakespeare",
    "parse_play",
    "split_holdout",
]
