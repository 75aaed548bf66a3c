"""A whole tiny federation (real ClientApps) with central DP, secure aggregation and a
budget."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from fedtune.metrics import read_events

from ..conftest import simulate_here

SIGMA, DELTA, POPULATION, SAMPLE = 0.8, 1e-4, 6, 3


def independent_epsilon(rounds: int) -> float:
    """dp-accounting directly: 3 of 6 clients without replacement, replace-one (the clipped
    sum's sensitivity is 2C, so the event's multiplier is sigma / 2)."""
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    gaussian = dp_accounting.GaussianDpEvent(SIGMA / 2)
    accountant.compose(
        dp_accounting.SampledWithoutReplacementDpEvent(POPULATION, SAMPLE, gaussian), rounds
    )
    return accountant.get_epsilon(DELTA)


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "private"
    budget = (independent_epsilon(2) + independent_epsilon(3)) / 2  # round 3 would exceed it
    simulate_here(
        "tiny",
        out,
        *("--set", "run.rounds=3", "--set", 'privacy.mode="central"'),
        *("--set", f"privacy.noise_multiplier={SIGMA}", "--set", f"privacy.target_delta={DELTA}"),
        *("--set", f"privacy.max_epsilon={budget}", "--set", "privacy.secure_aggregation=true"),
    )
    return out


def test_each_round_reports_the_epsilon_dp_accounting_computes(private_run):
    rounds = [e for e in read_events(private_run / "metrics.jsonl", "round") if e["round"] > 0]
    assert [r["round"] for r in rounds] == [1, 2]  # round 3 was refused
    for r in rounds:
        assert r["status"] == "ok" and r["participants"] == SAMPLE
        assert r["epsilon"] == pytest.approx(independent_epsilon(r["round"]), rel=0.01)
        assert r["secagg_bytes"] > 0 and r["secagg_seconds"] > 0


def test_the_over_budget_round_ends_the_run_cleanly(private_run):
    summary = json.loads((private_run / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert (private_run / "adapter" / "adapter_model.safetensors").is_file()
    privacy = summary["privacy"]
    assert privacy["epsilon"] == pytest.approx(independent_epsilon(2), rel=0.01)
    assert privacy["epsilon"] <= privacy["max_epsilon"] and privacy["refused_round"] == 3
    assert privacy["secure_aggregation"] is True
    expected = {
        "delta": DELTA,
        "noise_multiplier": SIGMA,
        "sampling": "without_replacement",
        "sampling_rate": SAMPLE / POPULATION,
        "population": POPULATION,
        "sample_size": SAMPLE,
        "rounds": 2,
    }
    assert {k: privacy[k] for k in expected} == expected
    # Masked uploads are validated like plaintext ones: no client was rejected.
    updates = list(read_events(private_run / "metrics.jsonl", "client_update"))
    assert len(updates) == 2 * SAMPLE and {u["status"] for u in updates} == {"ok"}
