"""Quantized frozen bases: every backend really quantizes, and LoRA trains on top.

Tiny Llama's layers are 64 wide: bitsandbytes blocks and HQQ groups of 64 divide them.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import pytest
import torch

from fedtune.config import (
    LoraConfig,
    ModelConfig,
    client_spec,
    load_scenario,
    scenario_from_client_spec,
)
from fedtune.engines import Update, get_engine
from fedtune.errors import ConfigError, ModelError
from fedtune.evaluation import perplexity
from fedtune.models import (
    adapter_state,
    attach_lora,
    load_base_model,
    load_tokenizer,
    quantize_base,
    save_adapter,
)

from ..conftest import engine_config

BACKENDS = ("int8", "nf4", "int4")
DTYPES = ("fp32", "bf16")
LORA = LoraConfig(r=4, alpha=8)


def is_quantized(layer: torch.nn.Module, quantization: str) -> bool:
    """``layer`` holds its weight in the backend's own quantized form (int8 or 4 bits)."""
    if quantization == "int8":
        from torchao.quantization import Int8Tensor

        weight = layer.weight
        return isinstance(weight, Int8Tensor) and weight.qdata.dtype == torch.int8
    if quantization == "nf4":
        import bitsandbytes as bnb

        weight = layer.weight
        return (
            isinstance(layer, bnb.nn.Linear4bit)
            and weight.quant_type == "nf4"
            and weight.dtype == torch.uint8
            and weight.numel() * 2 == layer.in_features * layer.out_features  # 2 per byte
        )
    from hqq.core.quantize import HQQLinear

    return (
        isinstance(layer, HQQLinear)
        and layer.meta["nbits"] == 4
        and layer.W_q.numel() * 2 == layer.in_features * layer.out_features
    )


@functools.cache
def chunks() -> torch.Tensor:
    from fedtune.data import chunk_tokens

    text = "To be, or not to be: that is the question.\n" * 40
    return chunk_tokens(load_tokenizer("tiny-llama"), text, 32)[:2]


@functools.cache
def trained(quantization: str, compute_dtype: str) -> tuple[Any, Update, dict[str, torch.Size]]:
    """The LoRA model, evaluated once, then after 8 backprop steps on one fixed batch."""
    base = load_base_model("tiny-llama", compute_dtype, quantization=quantization)
    model = attach_lora(base, LORA, seed=0)
    shapes = {k: v.shape for k, v in adapter_state(model).items()}
    # An evaluation before training, as a client that evaluates would do (it once
    # broke training on the bitsandbytes base: see quantization._nf4).
    perplexity(model, chunks())
    config = engine_config("backprop", lr=1e-2, local_steps=8, batch_size=2, seed=0)
    return model, get_engine("backprop").train(model, chunks(), config), shapes


@pytest.mark.parametrize("compute_dtype", DTYPES)
@pytest.mark.parametrize("quantization", BACKENDS)
def test_decoder_linears_stay_quantized_and_the_rest_does_not(quantization, compute_dtype):
    model, _, _ = trained(quantization, compute_dtype)
    base = model.get_base_model()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute_dtype]
    for layer in base.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            module = getattr(layer.self_attn, name)
            assert is_quantized(getattr(module, "base_layer", module), quantization), name
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert is_quantized(getattr(layer.mlp, name), quantization), name
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == dtype
    assert base.model.embed_tokens.weight.dtype == dtype
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize("compute_dtype", DTYPES)
@pytest.mark.parametrize("quantization", BACKENDS)
def test_lora_trains_on_the_quantized_base(quantization, compute_dtype):
    _, update, shapes = trained(quantization, compute_dtype)
    _, reference, reference_shapes = trained("none", compute_dtype)
    assert update.metrics["loss-last"] < update.metrics["loss-first"]
    # Quantization error is small next to what 8 steps learn: the loss falls about as
    # far as on the full-precision base (when bitsandbytes' repacked weight passed no
    # gradient, it fell 5 % as far and still fell).
    drop = update.metrics["loss-first"] - update.metrics["loss-last"]
    reference_drop = reference.metrics["loss-first"] - reference.metrics["loss-last"]
    assert drop > 0.8 * reference_drop
    assert shapes == reference_shapes
    assert {k: v.shape for k, v in update.state.items()} == reference_shapes
    assert all(v.dtype == torch.float32 for v in update.state.values())


@pytest.mark.parametrize("quantization", BACKENDS)
def test_adapter_from_a_quantized_base_loads_on_the_full_one(quantization, tmp_path):
    from peft import PeftModel

    model, update, _ = trained(quantization, "fp32")
    out = save_adapter(model, update.state, tmp_path / "adapter")
    full = adapter_state(PeftModel.from_pretrained(load_base_model("tiny-llama"), out))
    assert full.keys() == update.state.keys()
    assert all(torch.equal(full[k], v) for k, v in update.state.items())


def test_quantization_is_validated_and_travels_to_clients():
    with pytest.raises(ConfigError, match="'model.quantization' must be 'none', 'int8', 'nf4'"):
        ModelConfig(quantization="int3")
    with pytest.raises(ConfigError, match="model.quantization.*'fp8'"):
        load_scenario("quickstart", ["model.quantization=fp8"])
    scenario = load_scenario("quickstart", ["model.quantization=nf4"])
    assert scenario_from_client_spec(client_spec(scenario)).model.quantization == "nf4"
    with pytest.raises(ModelError, match="unknown model.quantization 'int3'"):
        quantize_base(torch.nn.Module(), "int3", torch.float32)


def test_missing_backend_names_the_package_and_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "hqq", None)  # how Python marks a module absent
    with pytest.raises(ModelError, match=r"'int4' needs the hqq package.*pip install 'hqq"):
        load_base_model("tiny-llama", quantization="int4")


def test_int4_refuses_layers_its_groups_do_not_divide():
    import transformers

    # q_proj holds 40 x 40 = 1,600 weights: 25 groups of 64, which HQQ cannot pack.
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=40,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(ModelError, match="multiple of 128; a 40x40 layer is not"):
        quantize_base(model, "int4", torch.float32)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny Llama saved as a Hugging Face folder (fp32 safetensors)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    load_base_model("tiny-llama").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("compute_dtype", DTYPES)
@pytest.mark.parametrize("quantization", BACKENDS)
def test_a_folder_quantized_while_loading_equals_one_quantized_after(
    quantization, compute_dtype, tiny_folder
):
    from fedtune.models.families import load_pretrained

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute_dtype]
    loaded = load_base_model(str(tiny_folder), compute_dtype, quantization=quantization)
    after = quantize_base(
        load_pretrained(tiny_folder, dtype=dtype, attn_implementation="eager"), quantization, dtype
    ).eval()
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    assert is_quantized(loaded.model.layers[1].mlp.down_proj, quantization)
    ids = chunks()[:, :16]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, after(ids).logits)


def test_quantizing_while_loading_refuses_a_missing_weight(tiny_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    for name in ("config.json", "generation_config.json"):
        shutil.copy(tiny_folder / name, tmp_path / name)
    weights = load_file(tiny_folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="lacks 1 weight.*layers.1.mlp.up_proj.weight"):
        load_base_model(str(tmp_path), quantization="int8")


def test_int8_backward_keeps_no_full_precision_weight():
    """The int8 layer saves its int8 matrix for the backward, not a dequantized copy,
    and passes the same gradient as the dequantized matrix would."""
    from fedtune.models.quantization import Int8WeightOnlyLinear

    model = attach_lora(load_base_model("tiny-llama", quantization="int8"), LORA, seed=0)
    linears = [m for m in model.modules() if isinstance(m, Int8WeightOnlyLinear)]
    weight_shapes = {tuple(m.weight.shape) for m in linears}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    saved: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    ids = chunks()[:, :10]  # 20 tokens: no activation is shaped like a weight (32..128)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    float_weights = [t for t in saved if t.is_floating_point() and tuple(t.shape) in weight_shapes]
    assert not float_weights
    assert any(t.dtype == torch.int8 for t in saved)

    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for m in linears:  # the same layers holding their dequantized matrix in fp32
        w = m.weight
        m.weight = torch.nn.Parameter(w.qdata.float() * w.scale.float(), requires_grad=False)
        m.forward = torch.nn.Linear.forward.__get__(m)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)
