"""The gradient-free engines in whole federations of real ClientApps on tiny-llama.

Zeroth-order clients upload only their seed steps; with ``fedkseed`` the global adapter
is the initial one plus the merged steps of every round, which clients replay to catch
up instead of downloading the adapter. ``client.engine = "auto"`` gives a device too
small for backprop the zeroth-order engine.
"""

from __future__ import annotations

import torch

from fedtune.checkpoint import load_latest_checkpoint
from fedtune.config import LoraConfig
from fedtune.engines.seeds import replay, seed_pool
from fedtune.metrics import read_events
from fedtune.models import adapter_state, attach_lora, load_base_model

from ..conftest import simulate_here, watch_and_board

ZEROTH = [
    "--set",
    "client.engine='zeroth'",
    "--set",
    "client.local_steps=6",
    "--set",
    "client.lr=1e-3",
]


def test_zeroth_uploads_seeds_and_fedkseed_clients_catch_up_bit_for_bit(tmp_path):
    out = tmp_path / "zeroth"
    simulate_here(
        "tiny", out, *ZEROTH, "--set", "strategy.name='fedkseed'", "--set", "run.rounds=4",
    )  # fmt: skip
    updates = list(read_events(out / "metrics.jsonl", "client_update"))
    assert updates and all(u["status"] == "ok" and u["engine"] == "zeroth" for u in updates)
    # Seed steps only: the same few hundred bytes whatever the adapter's size.
    assert max(u["bytes_up"] for u in updates) < 1000
    full = max(u["bytes_down"] for u in updates)
    caught_up = [u for u in updates if u["bytes_down"] < full]
    assert caught_up and all(u["round"] > 1 for u in caught_up)

    # The global adapter is the initial one with the history of merged steps replayed.
    lora = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj"))
    initial = adapter_state(attach_lora(load_base_model("tiny-llama"), lora, seed=0))
    last = load_latest_checkpoint(out / "checkpoints")
    history = last.strategy["custom"]["seed_history"]
    assert len(history) == 4
    steps = [step for merged in history for step in merged]
    rebuilt = replay(initial, steps, seed_pool(0, 4096), 1e-3)
    assert all(torch.equal(rebuilt[k], last.adapter[k]) for k in rebuilt)
    assert not all(torch.equal(initial[k], last.adapter[k]) for k in initial)


def test_fedkseed_pro_sends_seed_probabilities_and_clients_draw_by_them(tmp_path):
    out = tmp_path / "pro"
    simulate_here(
        "tiny", out, *ZEROTH, "--set", "strategy.name='fedkseed'",
        "--set", "strategy.importance=true", "--set", "client.num_seeds=64",
    )  # fmt: skip
    updates = list(read_events(out / "metrics.jsonl", "client_update"))
    assert updates and all(u["status"] == "ok" for u in updates)
    # Round 2's messages carry a probability per seed (4 bytes each) on top of round 1's.
    first = min(u["bytes_down"] for u in updates if u["round"] == 1)
    full_second = max(u["bytes_down"] for u in updates if u["round"] == 2)
    assert 64 * 4 <= full_second - first < 64 * 4 + 300
    history = load_latest_checkpoint(out / "checkpoints").strategy["custom"]["seed_history"]
    assert len(history) == 2 and all(0 <= i < 64 for merged in history for i, _ in merged)


def test_forward_and_zeroth_train_under_fedavg(tmp_path):
    for engine in ("forward", "zeroth"):
        out = tmp_path / engine
        simulate_here(
            "tiny", out, *ZEROTH, "--set", f"client.engine={engine!r}",
            # forward: a jvp per direction, 4 directions a step (its variance control off)
            "--set", "client.local_steps=2", "--set", "client.max_perturbations=4",
        )  # fmt: skip
        updates = list(read_events(out / "metrics.jsonl", "client_update"))
        assert all(u["status"] == "ok" and u["engine"] == engine for u in updates)
        rounds = [r for r in read_events(out / "metrics.jsonl", "round")]
        assert rounds[-1]["perplexity"] != rounds[0]["perplexity"]
        if engine == "zeroth":  # seeds up, the whole adapter down (fedavg keeps no history)
            assert all(u["bytes_up"] < 1000 < u["bytes_down"] for u in updates)


def test_auto_gives_a_device_too_small_for_backprop_the_zeroth_engine(tmp_path):
    tiers = watch_and_board(tmp_path)
    out = tmp_path / "run"
    simulate_here(
        "tiny", out,
        "--set", "client.engine='auto'", "--set", "devices.enabled=true",
        "--set", f"devices.profiles={str(tiers)!r}", "--set", 'devices.tiers=["watch", "board"]',
        "--set", "round.clients_per_round=6", "--set", "round.min_reports=1",
        "--set", "round.deadline_s=100", "--set", "run.rounds=3",
    )  # fmt: skip
    updates = list(read_events(out / "metrics.jsonl", "client_update"))
    # Round 1: no footprint is known yet, every device trains with backprop.
    assert {u["engine"] for u in updates if u["round"] == 1} == {"backprop"}
    # Then the board keeps backprop; the 100 MB watch switches to zeroth-order, and once
    # that footprint is measured too, it is not sent work it cannot hold.
    assert {u["engine"] for u in updates if u["tier"] == "board"} == {"backprop"}
    watch = {r: [u for u in updates if u["tier"] == "watch" and u["round"] == r] for r in (2, 3)}
    assert watch[2] and all(u["engine"] == "zeroth" and u["status"] == "ok" for u in watch[2])
    assert watch[3] and all(u["engine"] == "zeroth" and u["status"] == "dropped" for u in watch[3])
    assert all(u["reason"].startswith("does not fit: zeroth training") for u in watch[3])
