"""The real SmolLM2-135M-Instruct: offline conversion, a short federated run, reload."""

from __future__ import annotations

import json

import pytest

from ..conftest import simulate_here

pytestmark = pytest.mark.slow


def test_smollm2_converts_once_and_loads():
    from fedtune.models import load_base_model, model_dir

    folder = model_dir("smollm2-135m")
    assert (folder / ".complete").is_file() and (folder / "config.json").is_file()
    model = load_base_model("smollm2-135m")
    params = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < params < 135_000_000
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576


def test_short_run_improves_and_adapter_reloads(tmp_path):
    from peft import PeftModel

    from fedtune.config import load_scenario
    from fedtune.data import build_population, eval_chunks
    from fedtune.evaluation import perplexity
    from fedtune.models import load_base_model, load_tokenizer

    out = tmp_path / "run"  # in this process: what Ray adds is tested on the tiny model
    simulate_here(
        "quickstart",
        out,
        "--set",
        "run.rounds=1",
        "--set",
        "round.clients_per_round=2",
        "--set",
        "client.local_steps=3",
        "--set",
        "data.eval_chunks=8",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_perplexity"] < summary["initial_perplexity"]
    # The adapter names its base as others load it, and its card says what it is.
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (out / "adapter" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "dequantized from the GGUF file" in card
    assert f"{summary['final_perplexity']:.3f} after" in card

    scenario = load_scenario(out / "scenario.toml")
    model = PeftModel.from_pretrained(load_base_model("smollm2-135m"), out / "adapter")
    held_out = eval_chunks(
        load_tokenizer("smollm2-135m"),
        build_population(scenario.data),
        scenario.data,
        scenario.client.seq_len,
    )
    ppl = perplexity(model, held_out, scenario.run.eval_batch_size)
    assert ppl == pytest.approx(summary["final_perplexity"], rel=1e-2)
