"""The instruct scenario as a real federation (in-process, tiny model): instruction rows
train through the ClientApp, and every round event carries the scores beyond
perplexity; the run folder holds the partition report and plot."""

from __future__ import annotations

import pytest

from fedtune.metrics import read_events
from fedtune.report import write_report

from ..conftest import simulate_here

pytestmark = pytest.mark.heavy  # a two-round in-process federation with generation: ~1 min


def test_instruct_runs_with_per_client_and_generation_scores(tmp_path):
    out = tmp_path / "run"
    summary = simulate_here(
        "instruct",
        out,
        *("--set", "model.name=tiny-llama", "--set", "lora.r=4", "--set", "lora.alpha=8"),
        *("--set", "run.rounds=2", "--set", "client.local_steps=2"),
        *("--set", "client.batch_size=4", "--set", "round.clients_per_round=2"),
        *("--set", "round.min_reports=2", "--set", "data.eval_chunks=8"),
        *("--set", "evaluation.examples=4", "--set", "evaluation.max_new_tokens=4"),
        *("--set", "evaluation.clients=4"),
    )
    assert summary["rounds_completed"] == 2
    rounds = list(read_events(out / "metrics.jsonl", "round"))
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:  # round 0 is the base model's score
        assert len(r["client_perplexity"]) == 4
        assert r["client_perplexity_worst_decile"] >= r["client_perplexity_mean"]
        assert 0.0 <= r["rouge_l"] <= 1.0 and "exact_match" in r
    assert (out / "partitions.png").is_file() and "| train |" in (out / "partitions.md").read_text()
    assert "worst decile" in write_report(out).read_text()
