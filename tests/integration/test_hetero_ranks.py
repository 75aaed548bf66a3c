"""Device tiers of different LoRA ranks in whole federations (real ClientApps).

Two tiers: "small" trains rank 2, "big" the scenario's rank 4. Every accepted update is
kept (``run.save_updates``), so the ranks the clients really trained are checked
tensor by tensor against the tier each client was given.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedtune.checkpoint import Checkpoint, checkpoint_path
from fedtune.metrics import read_events
from fedtune.strategies.lora_math import rank_of

from ..conftest import run_cli, simulate_here

TIERS = "".join(
    f"[tiers.{name}]\nslowdown = 1\nmemory_mb = 64000\nuplink_mbps = 100\ndownlink_mbps = 100\n"
    f"availability = 1\ndropout = 0\nlora_rank = {rank}\n\n"
    for name, rank in (("small", 2), ("big", 0))
)


def settings(tmp: Path, strategy: str) -> list[str]:
    tiers = tmp / "tiers.toml"
    tiers.write_text(TIERS)
    return [
        "--set",
        f"strategy.name={strategy!r}",
        "--set",
        "devices.enabled=true",
        "--set",
        f"devices.profiles={str(tiers)!r}",
        "--set",
        "run.save_updates=true",
        "--set",
        "round.deadline_s=1e6",
        "--set",
        "round.clients_per_round=6",  # every client, both tiers, every round
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ranks")
    found = {}
    for name in ("flora", "hetlora", "flexlora"):
        simulate_here("tiny", root / name, *settings(root, name))
        found[name] = root / name
    return found


@pytest.mark.parametrize("name", ["flora", "hetlora", "flexlora"])
def test_each_client_trains_its_tier_rank_and_the_global_keeps_lora_r(runs, name):
    run = runs[name]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["clients_rejected"] == 0
    events = [e for e in read_events(run / "metrics.jsonl", "client_update") if e["status"] == "ok"]
    ranks = {}
    for event in events:
        path = (
            run
            / "updates"
            / f"round-{event['round']:05d}"
            / f"client-{event['client']:05d}.safetensors"
        )
        ranks[event["tier"]] = ranks.get(event["tier"], set()) | {rank_of(load_file(path))}
    assert ranks == {"small": {2}, "big": {4}}, ranks
    for rnd in (1, 2):
        adapter = Checkpoint.from_bytes(
            checkpoint_path(run / "checkpoints", rnd).read_bytes()
        ).adapter
        assert rank_of(adapter) == 4
    # A small-rank client downloads less under truncating strategies, the whole adapter under FLoRA.
    down = {e["tier"]: e["bytes_down"] for e in events}
    assert (down["small"] < down["big"]) == (name != "flora")


def test_a_strategy_that_cannot_mix_ranks_stops_before_the_run(tmp_path):
    out = tmp_path / "fedavg"
    args = settings(tmp_path, "fedavg")
    result = run_cli("simulate", "tiny", "--out", str(out), "--no-progress", *args)
    assert result.returncode == 2
    assert "cannot aggregate adapters of different LoRA ranks" in result.stderr
    assert "small (rank 2)" in result.stderr
    assert not (out / "summary.json").exists()
