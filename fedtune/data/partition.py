"""Rows -> clients with flwr-datasets' partitioners, and the partition's report.

``data.partitioner`` picks one of flwr-datasets' own classes — ``natural``
(``NaturalIdPartitioner`` over ``client_column``), ``iid`` (``IidPartitioner``),
``dirichlet`` (``DirichletPartitioner`` over ``label_column`` with ``alpha``),
``shards`` (``PathologicalPartitioner``, ``classes_per_client`` labels each) or
``size`` (``LinearPartitioner``: client k holds rows in proportion to k+1). Every
random choice takes ``data.partition_seed``: ``iid`` and ``size`` split the table
after a seeded shuffle (their flwr-datasets classes take contiguous slices), the
others take the seed themselves. The report (``partitions.md`` with a row per client,
and flwr-datasets' ``plot_label_distributions`` as ``partitions.png``) goes into the
run folder.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedtune.config import DataConfig
from fedtune.data.rows import load_rows
from fedtune.data.sources import ClientText, Example
from fedtune.errors import DataError

SPLIT_SEED = 20240611
"""Seed of the held-out rows (``data.eval_fraction``); shared with the population's
split so no run seed moves the evaluation set."""


@dataclass(frozen=True)
class Partitioned:
    """A table split into clients: what the population and the report are made of."""

    partitioner: Any
    """The flwr-datasets partitioner, its dataset assigned (the training rows)."""
    clients: tuple[ClientText, ...]
    """One client per partition, in partition order."""
    held_out: ClientText | None
    """The held-out rows (``data.eval_path``, or ``data.eval_fraction > 0``) as one
    evaluation client."""


def make_partitioner(cfg: DataConfig, num_partitions: int) -> Any:
    """The flwr-datasets partitioner ``cfg`` names (its dataset not yet assigned)."""
    from flwr_datasets import partitioner as fp

    kind = cfg.partitioner
    if kind == "natural":
        return fp.NaturalIdPartitioner(partition_by=cfg.client_column)
    if kind == "iid":
        return fp.IidPartitioner(num_partitions=num_partitions)
    if kind == "size":
        return fp.LinearPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return fp.DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=cfg.label_column,
            alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size,
            seed=cfg.partition_seed,
        )
    if kind == "shards":
        return fp.PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=cfg.label_column,
            num_classes_per_partition=cfg.classes_per_client,
            seed=cfg.partition_seed,
        )
    raise DataError(f"unknown data.partitioner {kind!r}")  # config validation stops it first


def assign_rows(table: Any, cfg: DataConfig, num_partitions: int) -> Any:
    """A partitioner of ``cfg`` with ``table`` assigned (shuffled first for ``iid`` and
    ``size``, whose flwr-datasets classes cut contiguous slices)."""
    partitioner = make_partitioner(cfg, num_partitions)
    if cfg.partitioner in ("iid", "size"):
        table = table.shuffle(seed=cfg.partition_seed, keep_in_memory=True).flatten_indices(
            keep_in_memory=True
        )
    partitioner.dataset = table
    return partitioner


@functools.lru_cache(maxsize=4)
def partition_rows(cfg: DataConfig) -> Partitioned:
    """``cfg``'s rows, minus the held-out fraction, split into clients."""
    table = load_rows(cfg)
    held_out = None
    if cfg.eval_path:
        # Read as a ``files`` source with the same mapping (errors name it as data.path).
        evaluation = replace(cfg, name="files", path=cfg.eval_path, eval_path="")
        held_out = to_client("held-out", load_rows(evaluation), cfg)
    elif cfg.eval_fraction > 0:
        parts = table.train_test_split(
            test_size=cfg.eval_fraction, seed=SPLIT_SEED, keep_in_memory=True
        )
        table, rest = parts["train"], parts["test"]
        held_out = to_client("held-out", rest, cfg)
    # Without held-out rows, eval_clients whole partitions are set aside later.
    count = cfg.num_clients + (cfg.eval_clients if held_out is None else 0)
    partitioner = assign_rows(table, cfg, count)
    try:
        parts_count = partitioner.num_partitions
        clients = []
        for pid in range(parts_count):
            rows = partitioner.load_partition(pid)
            name = (
                str(partitioner.partition_id_to_natural_id[pid])
                if cfg.partitioner == "natural"
                else f"{cfg.partitioner}-{pid:04d}"
            )
            clients.append(to_client(name, rows, cfg))
    except ValueError as exc:  # flwr-datasets' refusals (too few rows or labels, ...)
        raise DataError(
            f"data.partitioner = {cfg.partitioner!r} cannot split the rows: {exc}"
        ) from None
    return Partitioned(partitioner, tuple(clients), held_out)


def to_client(name: str, rows: Any, cfg: DataConfig) -> ClientText:
    """One client from its rows: raw text, or instruction examples (and their text)."""
    labels = [str(v) for v in rows[cfg.label_column]] if cfg.label_column else []
    group = Counter(labels).most_common(1)[0][0] if labels else ""
    if not cfg.instruction:
        column = rows[cfg.text_column]
        texts = [str(t) for t in column if t is not None]
        pairs = tuple(
            (str(t), label)
            for t, label in zip(column, labels or [""] * len(column), strict=True)
            if t is not None and labels
        )
        return ClientText(name, "\n".join(texts) + "\n", group, pairs=pairs)
    examples = tuple(to_example(row, cfg, name) for row in rows)
    text = "\n".join(content for example in examples for _, content in example) + "\n"
    return ClientText(name, text, group, examples)


def to_example(row: dict[str, Any], cfg: DataConfig, client: str) -> Example:
    """A row as chat turns ``((role, content), ...)``."""
    if cfg.prompt_column:
        system = (("system", cfg.system_prompt),) if cfg.system_prompt else ()
        prompt, response = row[cfg.prompt_column], row[cfg.response_column]
        return (*system, ("user", str(prompt or "")), ("assistant", str(response or "")))
    turns = row[cfg.messages_column]
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
        for t in turns
    ):
        raise DataError(
            f"data.messages_column = {cfg.messages_column!r}: client {client!r} has a row that "
            "is not a list of {'role': str, 'content': str}"
        )
    if not any(t["role"] == "assistant" for t in turns):
        raise DataError(
            f"data.messages_column = {cfg.messages_column!r}: client {client!r} has a "
            "conversation without an assistant turn (nothing to train on)"
        )
    return tuple((t["role"], t["content"]) for t in turns)


def client_table(
    cfg: DataConfig, train: tuple[ClientText, ...], evaluation: tuple[ClientText, ...]
) -> str:
    """A Markdown table with a row per client: role, examples or characters, top labels."""
    lines = [
        "| client | role | examples | characters | group (most common label) |",
        "|---|---|---:|---:|---|",
    ]
    for role, clients in (("train", train), ("eval", evaluation)):
        for index, client in enumerate(clients):
            shown = f"{index}: {client.client_id}" if role == "train" else client.client_id
            lines.append(
                f"| {shown} | {role} | {len(client.examples) or '-'} | {len(client.text)} "
                f"| {client.group or '-'} |"
            )
    return "\n".join(lines) + "\n"


def write_partition_report(cfg: DataConfig, folder: Path) -> list[Path]:
    """``partitions.md`` (every client) and, with a label column, flwr-datasets' label
    distribution plot ``partitions.png``; returns the files written."""
    from fedtune.data.population import build_population
    from fedtune.metrics import atomic_write_text

    folder = Path(folder)
    population = build_population(cfg)
    written = [folder / "partitions.md"]
    header = (
        f"# Clients of `data.name = {cfg.name!r}`, `data.partitioner = {cfg.partitioner!r}`\n\n"
        f"{len(population.train)} training clients (index = Flower partition id), "
        f"{len(population.evaluation)} evaluation set(s).\n\n"
    )
    atomic_write_text(
        written[0], header + client_table(cfg, population.train, population.evaluation)
    )
    if cfg.name in ("files", "chatterbot") and cfg.label_column:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from flwr_datasets.visualization import plot_label_distributions

        partitioner = partition_rows(cfg).partitioner
        figure, _, _ = plot_label_distributions(
            partitioner,
            label_name=cfg.label_column,
            plot_type="bar",
            size_unit="absolute",
            legend=True,
            verbose_labels=False,
            title=f"Rows per label and partition ({cfg.partitioner})",
        )
        figure.savefig(folder / "partitions.png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(folder / "partitions.png")
    return written
