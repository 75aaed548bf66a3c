"""The shipped phones scenario: a fleet of tiers on a simulated clock."""

from __future__ import annotations

import json

from fedtune.metrics import read_events

from ..conftest import simulate_here, watch_and_board


def test_phones_scenario_reports_tiers_and_simulated_time(tmp_path):
    out = tmp_path / "phones"
    simulate_here("phones", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["simulated_seconds"] > 0 and summary["clients_dropped"] > 0
    rounds = [r for r in read_events(out / "metrics.jsonl", "round") if r["round"] > 0]
    updates = list(read_events(out / "metrics.jsonl", "client_update"))
    for r in rounds:
        assert r["sampled"] == 12  # 8 per round with 50 % over-selection
        assert sum(r["sampled_by_tier"].values()) == 12
        if r["status"] == "ok":
            assert r["participants"] <= 8
            assert sum(r["participants_by_tier"].values()) == r["participants"]
            kept = [u for u in updates if u["round"] == r["round"] and u["status"] == "ok"]
            if r["participants"] == 8:  # the quorum filled: the round ends at its last report
                assert r["simulated_seconds"] == max(u["simulated_seconds"] for u in kept)
            else:  # the server waited for the deadline
                assert r["simulated_seconds"] == 0.6
    assert {u["tier"] for u in updates} <= {
        "flagship-phone",
        "mid-phone",
        "low-phone",
        "raspberry-pi",
        "jetson",
    }
    # Low-end phones train their tier's rank-4 adapter, the others the global rank 8.
    assert {u["lora_rank"] for u in updates if u["tier"] == "low-phone"} == {4}
    assert {u["lora_rank"] for u in updates if u["tier"] != "low-phone"} == {8}
    for u in updates:
        if u["status"] == "dropped":
            assert u["reason"]
        if u["status"] == "ok":
            assert u["simulated_seconds"] <= 0.6  # the deadline on simulated time


def test_a_device_too_small_for_the_training_is_not_sent_work(tmp_path):
    tiers = watch_and_board(tmp_path)
    out = tmp_path / "run"
    simulate_here(
        "phones",
        out,
        "--set",
        f"devices.profiles={tiers}",
        "--set",
        'devices.tiers=["watch", "board"]',
        "--set",
        "devices.weights=[1, 1]",
        "--set",
        "round.deadline_s=100",
        "--set",
        "round.min_reports=1",
    )
    updates = list(read_events(out / "metrics.jsonl", "client_update"))
    first = [u for u in updates if u["round"] == 1]
    later = [u for u in updates if u["round"] > 1]
    # Round 1 measures the footprint (nothing is refused before it is known) ...
    assert not any("does not fit" in u.get("reason", "") for u in first)
    # ... then a 100 MB watch is never sent work again, and says why.
    watches = [u for u in later if u["tier"] == "watch"]
    assert watches and all(u["status"] == "dropped" for u in watches)
    assert all(u["reason"].startswith("does not fit: backprop training needs ~") for u in watches)
    assert all(u["bytes_down"] == 0 and u["bytes_up"] == 0 for u in watches)
    assert any(u["status"] == "ok" for u in later if u["tier"] == "board")


def test_auto_sends_probes_to_a_device_too_small_for_backprop(tmp_path):
    """client.auto_fallback = "forward": once backprop's footprint is known, the watch is
    asked for FwdLLM's probes (seed uploads, bytes not megabytes) instead of being
    dropped; probes have a footprint of their own, so a 100 MB watch is dropped again
    once that is measured too."""
    tiers = watch_and_board(tmp_path)
    # The watch's tier trains rank 4 (HetLoRA, the scenario's strategy): probes replay on
    # the rank-4 adapter it was sent.
    tiers.write_text(
        tiers.read_text().replace("memory_mb = 100\n", "memory_mb = 100\nlora_rank = 4\n")
    )
    out = tmp_path / "run"
    simulate_here(
        "phones",
        out,
        *("--set", f"devices.profiles={tiers}"),
        *("--set", 'devices.tiers=["watch", "board"]'),
        *("--set", "devices.weights=[1, 1]"),
        *("--set", "round.deadline_s=100"),
        *("--set", "round.min_reports=1"),
        *("--set", "client.engine=auto"),
        *("--set", "client.auto_fallback=forward"),
    )
    updates = list(read_events(out / "metrics.jsonl", "client_update"))
    by_round = {
        r: [u for u in updates if u["round"] == r and u["tier"] == "watch"] for r in (1, 2, 3)
    }
    assert by_round[1] and all(u["engine"] == "backprop" for u in by_round[1])
    probing = by_round[2]
    assert probing and all(u["engine"] == "forward" for u in probing)
    assert any(u["status"] == "ok" for u in probing)  # the rest: over-selected surplus
    assert {u["lora_rank"] for u in probing} == {4}
    assert all(u["bytes_up"] < 2_000 for u in probing)  # 4 probes x 8 bytes, plus records
    boards = [u for u in updates if u["round"] == 2 and u["tier"] == "board"]
    assert boards and all(u["engine"] == "backprop" for u in boards)
    assert all(u["status"] == "dropped" for u in by_round[3])
    assert all(u["reason"].startswith("does not fit: forward training") for u in by_round[3])
