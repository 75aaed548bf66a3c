"""``fedtune export``: each format written from a run folder and read back by its runtime.

The run folder is what a run leaves (``scenario.toml`` and the PEFT ``adapter/``),
written by the same functions the server uses, with a trained-looking adapter (B != 0)
so that merging changes the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.config import load_scenario
from fedtune.errors import FedtuneError
from fedtune.metrics import atomic_write_text
from fedtune.models import adapter_state, attach_lora, load_base_model, save_adapter
from fedtune.models.export import export_run, load_run
from fedtune.models.gguf_lora import llama_rope_permute


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    scenario = load_scenario("tiny", ["lora.targets=[]"])
    model = attach_lora(load_base_model(scenario.model.name), scenario.lora, seed=0)
    gen = torch.Generator().manual_seed(1)
    state = {
        k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in adapter_state(model).items()
    }
    save_adapter(model, state, folder / "adapter")
    atomic_write_text(folder / "scenario.toml", scenario.to_toml())
    return folder


def ids() -> torch.Tensor:
    return torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(2))


def peft_logits(run_dir: Path) -> torch.Tensor:
    _, model = load_run(run_dir)
    with torch.no_grad():
        return model(input_ids=ids()).logits


def test_peft_export_reloads_to_the_same_model(run_dir, tmp_path):
    from peft import PeftModel

    out = export_run(run_dir, "peft", tmp_path / "peft")
    model = PeftModel.from_pretrained(load_base_model("tiny-llama"), out)
    with torch.no_grad():
        got = model(input_ids=ids()).logits
    torch.testing.assert_close(got, peft_logits(run_dir), rtol=0, atol=0)


def test_merged_export_matches_base_plus_adapter(run_dir, tmp_path):
    import transformers

    out = export_run(run_dir, "merged", tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=ids()).logits
        base = load_base_model("tiny-llama")(input_ids=ids()).logits
    torch.testing.assert_close(got, peft_logits(run_dir), rtol=1e-4, atol=1e-4)
    assert (got - base).abs().max() > 1e-2  # the adapter is in it


def test_onnx_export_runs_in_onnxruntime_like_the_merged_model(run_dir, tmp_path):
    import onnxruntime as ort

    out = export_run(run_dir, "onnx", tmp_path / "onnx")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = ids()
    (logits,) = session.run(
        ["logits"], {"input_ids": x.numpy(), "attention_mask": np.ones_like(x.numpy())}
    )
    reference = peft_logits(run_dir).numpy()
    assert logits.shape == reference.shape  # dynamic batch and length: (2, 12), not (1, 8)
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)


def test_gguf_export_follows_llama_cpp_lora_conventions(run_dir, tmp_path):
    import gguf

    out = export_run(run_dir, "gguf", tmp_path / "gguf")
    reader = gguf.GGUFReader(out / "adapter.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)
    tensors = {t.name: t for t in reader.tensors}
    # 2 layers x (q, v) x (A, B): the tiny model's default targets.
    assert sorted(tensors) == sorted(
        f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in (0, 1) for p in "qv" for ab in "ab"
    )
    _, model = load_run(run_dir)
    layer = model.base_model.model.model.layers[0].self_attn
    for proj, gguf_name in ((layer.v_proj, "attn_v"), (layer.q_proj, "attn_q")):
        a = proj.lora_A["default"].weight.detach()
        b = proj.lora_B["default"].weight.detach()
        got_a = torch.from_numpy(np.array(tensors[f"blk.0.{gguf_name}.weight.lora_a"].data))
        got_b = torch.from_numpy(np.array(tensors[f"blk.0.{gguf_name}.weight.lora_b"].data))
        assert got_a.shape == a.shape == (4, 64) and got_b.shape == b.shape
        assert torch.equal(got_a, a)
        # llama.cpp keeps q's rows in its rotary order: B's rows are permuted, as the base's.
        want_b = llama_rope_permute(b, 4) if gguf_name == "attn_q" else b
        assert torch.equal(got_b, want_b)
    assert not torch.equal(llama_rope_permute(b, 4), b)


def test_rope_permutation_is_the_inverse_of_transformers_gguf_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(8 * 8 * 3, dtype=torch.float32).reshape(64 // 8 * 8, 3)
    reader = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 4})
    back = reader._reverse_permute_weights(llama_rope_permute(w, 4).numpy(), 4, 4)
    assert np.array_equal(back, w.numpy())


def test_export_cli_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    from fedtune.cli import main

    assert main(["export", str(tmp_path), "--format", "merged"]) == 2
    assert "not a finished run folder" in capsys.readouterr().err


def test_export_refuses_a_non_empty_out(run_dir, tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(FedtuneError, match="not empty"):
        export_run(run_dir, "peft", tmp_path)


@pytest.mark.slow
def test_gguf_names_and_q_k_order_match_the_smollm2_base_file():
    """The export's tensor names exist in the GGUF base llama.cpp loads, and its q/k row
    order is the file's: the dequantized base rows equal our permutation of the HF rows."""
    import gguf
    from gguf.quants import dequantize

    from fedtune.models.base import base_gguf
    from fedtune.models.gguf_lora import GGUF_ARCHS

    model = load_base_model("smollm2-135m", num_layers=2)
    reader = gguf.GGUFReader(base_gguf("smollm2-135m"))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == GGUF_ARCHS["llama"][0]
    attn = model.model.layers[1].self_attn
    cfg = model.config
    for proj, name, heads in (
        (attn.q_proj, "attn_q", cfg.num_attention_heads),
        (attn.k_proj, "attn_k", cfg.num_key_value_heads),
        (attn.v_proj, "attn_v", 0),
    ):
        t = tensors[f"blk.1.{name}.weight"]
        base = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(proj.weight.shape))
        want = llama_rope_permute(proj.weight, heads) if heads else proj.weight
        torch.testing.assert_close(base.float(), want.detach(), rtol=0, atol=1e-6)
