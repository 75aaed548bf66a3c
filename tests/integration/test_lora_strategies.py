"""FFA-LoRA and FedSA-LoRA in whole federations of the tiny scenario (real ClientApps).

``run.save_updates`` keeps every accepted client update, so what the clients did is
checked tensor by tensor: under FFA-LoRA no client and no round moves A; under
FedSA-LoRA a client that trains again starts from its own B (kept in its Flower node
context between rounds), while a client in its first round starts from exactly what
FedAvg would have sent it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtune.checkpoint import Checkpoint, checkpoint_path

from ..conftest import simulate_here

Adapter = dict[str, torch.Tensor]


def simulate(out: Path, strategy: str) -> Path:
    simulate_here(
        "tiny", out, "--set", f"strategy.name={strategy}", "--set", "run.save_updates=true"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert 'name = "' + strategy + '"' in (out / "scenario.toml").read_text()
    return out


def updates(run: Path, rnd: int) -> dict[int, Adapter]:
    """Client index -> its accepted update of round ``rnd``."""
    folder = run / "updates" / f"round-{rnd:05d}"
    return {int(p.stem.split("-")[1]): load_file(p) for p in sorted(folder.glob("client-*"))}


def global_adapter(run: Path, rnd: int) -> Adapter:
    return Checkpoint.from_bytes(checkpoint_path(run / "checkpoints", rnd).read_bytes()).adapter


def same(a: Adapter, b: Adapter, part: str = "") -> bool:
    keys = [k for k in a if f"lora_{part}" in k]
    assert keys
    return all(torch.equal(a[k], b[k]) for k in keys)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-runs")
    return {name: simulate(root / name, name) for name in ("ffa-lora", "fedsa-lora", "fedavg")}


def test_ffa_lora_never_moves_a(runs):
    run = runs["ffa-lora"]
    initial = global_adapter(run, 0)
    for rnd in (1, 2):
        assert updates(run, rnd), f"no updates saved in round {rnd}"
        for client, update in updates(run, rnd).items():
            assert same(update, initial, "A"), f"client {client} moved A in round {rnd}"
            assert not same(update, initial, "B"), f"client {client} did not train B"
        assert same(global_adapter(run, rnd), initial, "A")
    assert not same(global_adapter(run, 2), initial, "B")


def test_fedsa_lora_clients_keep_their_b(runs):
    fedsa, fedavg = runs["fedsa-lora"], runs["fedavg"]
    # Round 1: nothing kept yet, so every client did exactly what it did under FedAvg,
    # and the global adapters (averaged A, averaged B) are the same bit for bit.
    first = updates(fedsa, 1)
    assert first.keys() == updates(fedavg, 1).keys()
    assert all(same(first[c], updates(fedavg, 1)[c]) for c in first)
    assert same(global_adapter(fedsa, 1), global_adapter(fedavg, 1))

    second, reference = updates(fedsa, 2), updates(fedavg, 2)
    returning = sorted(second.keys() & first.keys())
    new = sorted(second.keys() - first.keys())
    assert returning and new, f"seed 0 should sample both kinds: round 1 {sorted(first)}"
    for client in new:  # started from the global B it received, as under FedAvg
        assert same(second[client], reference[client]), client
    for client in returning:  # started from its own B of round 1, not the global one
        assert not same(second[client], reference[client], "B"), client
