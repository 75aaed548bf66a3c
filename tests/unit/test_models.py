from __future__ import annotations

import math

import pytest
import torch

from fedtune.config import LoraConfig
from fedtune.errors import ConfigError, ModelError
from fedtune.evaluation import perplexity
from fedtune.models import (
    adapter_state,
    attach_lora,
    load_adapter_state,
    load_base_model,
    save_adapter,
)


def test_tiny_model_is_deterministic_and_frozen():
    a, b = load_base_model("tiny-llama"), load_base_model("tiny-llama")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
        assert not p.requires_grad
    assert a.config.num_hidden_layers == 2


def test_tiny_qwen2_builds():
    model = load_base_model("tiny-qwen2", num_layers=1)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 1


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown model 'gpt-9'.*smollm2-135m"):
        load_base_model("gpt-9")


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_base_model(str(tmp_path))


def test_lora_target_not_in_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="lora.targets.*qq_proj"):
        attach_lora(load_base_model("tiny-llama"), LoraConfig(targets=("qq_proj",)), seed=0)


def test_adapter_state_round_trips(tiny_peft):
    state = adapter_state(tiny_peft)
    assert state and all("lora_" in k for k in state)
    assert all(v.dtype == torch.float32 for v in state.values())
    changed = {k: v + 1.0 for k, v in state.items()}
    load_adapter_state(tiny_peft, changed)
    again = adapter_state(tiny_peft)
    assert all(torch.equal(again[k], changed[k]) for k in state)


def test_lora_init_is_seeded():
    base = load_base_model("tiny-llama")
    a = adapter_state(attach_lora(base, LoraConfig(r=4, alpha=8), seed=3))
    b = adapter_state(attach_lora(load_base_model("tiny-llama"), LoraConfig(r=4, alpha=8), seed=3))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_perplexity_is_exp_of_token_mean_loss(tiny_peft, tokenizer):
    chunks = torch.randint(0, 1000, (5, 16), generator=torch.Generator().manual_seed(0))
    ppl = perplexity(tiny_peft, chunks, batch_size=2)
    with torch.no_grad():
        loss = tiny_peft(input_ids=chunks, labels=chunks).loss
    assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_saved_adapter_loads_with_peft(tiny_peft, tmp_path):
    from peft import PeftModel

    state = {
        k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
        for k, v in adapter_state(tiny_peft).items()
    }
    out = save_adapter(tiny_peft, state, tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(load_base_model("tiny-llama"), out)
    chunks = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    assert perplexity(loaded, chunks) == pytest.approx(perplexity(tiny_peft, chunks), rel=1e-6)
