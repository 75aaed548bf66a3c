"""Real Flower simulations (Ray) on tiny-llama, through the real `fedtune` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtune.metrics import read_events

from ..conftest import run_cli

# tiny's own 120 s deadline: Ray's workers start (import torch, load the model) in the
# warm-up before round 1, not inside its deadline (on a loaded machine that start took
# over 120 s and once dropped every client of round 1).
TINY = [
    *("--set", "run.rounds=2", "--set", "round.clients_per_round=3"),
    "--no-progress",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    # One OpenMP thread, as `make test` runs: byte identity with the in-process rerun
    # below holds between processes of the same thread count (float sums in another order).
    result = run_cli("simulate", "tiny", "--out", str(out), *TINY, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out perplexity" in result.stdout
    return out


def test_run_folder_is_complete(tiny_run):
    for name in (
        "scenario.toml",
        "metrics.jsonl",
        "summary.json",
        "perplexity.png",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/README.md",
    ):
        assert (tiny_run / name).is_file(), name
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["scenario"] == "tiny"
    assert summary["rounds_completed"] == 2
    card = (tiny_run / "adapter" / "README.md").read_text()  # the model card
    assert "base_model: tiny-llama" in card and "2 of 2 rounds aggregated" in card
    assert f"{summary['final_perplexity']:.3f} after" in card and "```toml" in card
    for key in ("initial_perplexity", "final_perplexity", "bytes_up", "bytes_down", "wall_seconds"):
        assert summary[key] > 0, key


def test_events_record_every_client_update(tiny_run):
    rounds = list(read_events(tiny_run / "metrics.jsonl", "round"))
    updates = list(read_events(tiny_run / "metrics.jsonl", "client_update"))
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert len(updates) == 6
    assert {u["status"] for u in updates} == {"ok"}
    for u in updates:
        assert u["bytes_up"] > 0 and u["bytes_down"] > 0 and u["num_examples"] == 4
        assert u["loss"] > 0 and u["compute_seconds"] > 0 and u["peak_rss_mb"] > 0
    for r in rounds[1:]:
        assert r["participants"] == 3
        assert r["bytes_up"] == sum(u["bytes_up"] for u in updates if u["round"] == r["round"])
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["bytes_up"] == sum(u["bytes_up"] for u in updates)
    (warm,) = read_events(tiny_run / "metrics.jsonl", "warm_up")  # every Ray worker
    assert warm["workers"] >= 1 and warm["ready"] == warm["workers"] and warm["failed"] == 0


def test_training_lowers_loss_and_perplexity(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["final_perplexity"] < summary["initial_perplexity"]


def test_saved_adapter_reproduces_final_perplexity(tiny_run):
    from peft import PeftModel

    from fedtune.config import load_scenario
    from fedtune.data import build_population, eval_chunks
    from fedtune.evaluation import perplexity
    from fedtune.models import load_base_model, load_tokenizer

    scenario = load_scenario(tiny_run / "scenario.toml")
    base = load_base_model(scenario.model.name)
    model = PeftModel.from_pretrained(base, tiny_run / "adapter")
    tokenizer = load_tokenizer(scenario.model.name)
    held_out = eval_chunks(
        tokenizer, build_population(scenario.data), scenario.data, scenario.client.seq_len
    )
    summary = json.loads((tiny_run / "summary.json").read_text())
    ppl = perplexity(model, held_out, scenario.run.eval_batch_size)
    assert ppl == pytest.approx(summary["final_perplexity"], rel=1e-2)
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(bool(torch.any(p != 0)) for p in lora)  # it was trained


def test_same_seed_gives_identical_adapter_with_or_without_ray(tiny_run, tmp_path):
    """The run again with ``--in-process`` (no Ray: what sweeps, resumes' references and
    most tests use): the same clients are picked and the adapter is byte-identical."""
    out = tmp_path / "again"
    result = run_cli(
        "simulate", "tiny", "--out", str(out), "--in-process", *TINY, env={"OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first = (tiny_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == first

    def picked(run_dir):
        return sorted(
            (u["round"], u["client"])
            for u in read_events(run_dir / "metrics.jsonl", "client_update")
        )

    assert picked(out) == picked(tiny_run)


def test_existing_run_folder_is_refused(tiny_run):
    result = run_cli("simulate", "tiny", "--out", str(tiny_run), *TINY)
    assert result.returncode == 2
    assert "already holds a finished run" in result.stderr
