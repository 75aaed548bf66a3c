"""Rows -> clients through flwr-datasets' partitioners, seeded, and the run-folder report."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedtune.config import DataConfig
from fedtune.data import build_population
from fedtune.data.partition import partition_rows, write_partition_report

ROWS = 400
LABELS = 5


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    """400 Q->A rows over 5 labels of uneven size, as a parquet file."""
    import datasets

    rng = np.random.default_rng(0)
    labels = rng.choice(LABELS, size=ROWS, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    table = datasets.Dataset.from_dict(
        {
            "q": [f"question {i}" for i in range(ROWS)],
            "a": [f"answer {i}" for i in range(ROWS)],
            "label": [f"class-{k}" for k in labels],
        }
    )
    path = tmp_path_factory.mktemp("rows") / "rows.parquet"
    table.to_parquet(str(path))
    return path


def config(path, **kw) -> DataConfig:
    base = dict(
        name="files",
        path=str(path),
        prompt_column="q",
        response_column="a",
        label_column="label",
        min_chars=0,
        num_clients=8,
        eval_clients=2,
    )
    return DataConfig(**{**base, **kw})


def label_of(table_path) -> dict[str, str]:
    import pandas as pd

    frame = pd.read_parquet(table_path)
    return dict(zip(frame["q"], frame["label"], strict=True))


def counts(clients, labels: dict[str, str]) -> list[Counter]:
    """Each client's label counts, read back from its examples' prompts."""
    return [Counter(labels[e[0][1]] for e in c.examples) for c in clients]


def test_dirichlet_label_counts_match_flwr_datasets_for_the_same_seed(table_path):
    from flwr_datasets.partitioner import DirichletPartitioner

    from fedtune.data.rows import load_rows

    cfg = config(table_path, partitioner="dirichlet", alpha=0.3, partition_seed=7)
    ours = counts(partition_rows(cfg).clients, label_of(table_path))
    theirs = DirichletPartitioner(
        num_partitions=10, partition_by="label", alpha=0.3, min_partition_size=2, seed=7
    )
    theirs.dataset = load_rows(cfg)
    expected = [Counter(theirs.load_partition(i)["label"]) for i in range(10)]
    assert ours == expected
    assert sum(sum(c.values()) for c in ours) == ROWS
    # Another seed is another split; the population keeps 8 of the 10 for training.
    other = counts(
        partition_rows(config(table_path, partitioner="dirichlet", alpha=0.3)).clients,
        label_of(table_path),
    )
    assert other != ours
    population = build_population(cfg)
    assert (len(population.train), len(population.evaluation)) == (8, 2)


def test_small_alpha_is_skewed_and_shards_hold_few_labels(table_path):
    labels = label_of(table_path)
    skewed = counts(
        partition_rows(config(table_path, partitioner="dirichlet", alpha=0.1)).clients, labels
    )
    flat = counts(
        partition_rows(config(table_path, partitioner="dirichlet", alpha=100.0)).clients, labels
    )

    def top_share(cs: list[Counter]) -> float:
        return float(np.mean([max(c.values()) / sum(c.values()) for c in cs]))

    assert top_share(skewed) > top_share(flat) + 0.2
    shards = counts(
        partition_rows(config(table_path, partitioner="shards", classes_per_client=2)).clients,
        labels,
    )
    assert all(len(c) <= 2 for c in shards)


def test_iid_and_size_are_seeded_shuffles(table_path):
    labels = label_of(table_path)
    iid = partition_rows(config(table_path, partitioner="iid"))
    sizes = [len(c.examples) for c in iid.clients]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == ROWS
    assert counts(iid.clients, labels) != counts(
        partition_rows(config(table_path, partitioner="iid", partition_seed=1)).clients, labels
    )
    grown = [
        len(c.examples) for c in partition_rows(config(table_path, partitioner="size")).clients
    ]
    assert grown == sorted(grown) and grown[-1] > 5 * grown[0]


def test_held_out_rows_are_the_same_for_every_partitioner(table_path):
    a = build_population(config(table_path, partitioner="iid", eval_fraction=0.1))
    b = build_population(config(table_path, partitioner="dirichlet", alpha=0.1, eval_fraction=0.1))
    assert a.evaluation == b.evaluation and len(a.evaluation[0].examples) == ROWS // 10
    assert len(a.train) == 8


def test_the_report_has_a_row_per_client_and_the_label_plot(table_path, tmp_path):
    cfg = config(table_path, partitioner="dirichlet", alpha=0.5)
    written = write_partition_report(cfg, tmp_path)
    assert [p.name for p in written] == ["partitions.md", "partitions.png"]
    table = (tmp_path / "partitions.md").read_text()
    assert table.count("| train |") == 8 and table.count("| eval |") == 2
    assert (tmp_path / "partitions.png").read_bytes()[:4] == b"\x89PNG"


def test_a_held_out_file_is_the_evaluation_set(table_path, tmp_path):
    import datasets

    held = tmp_path / "held.jsonl"
    datasets.Dataset.from_dict({"q": ["q?", "r?"], "a": ["a.", "b."], "label": ["x", "y"]}).to_json(
        str(held), lines=True
    )
    population = build_population(config(table_path, partitioner="iid", eval_path=str(held)))
    assert len(population.train) == 8
    assert population.evaluation[0].examples == (
        (("user", "q?"), ("assistant", "a.")),
        (("user", "r?"), ("assistant", "b.")),
    )
