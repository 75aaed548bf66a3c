"""``fedtune export``: a run's adapter in the formats phones' inference apps load.

- ``peft``: the PEFT adapter folder as the run saved it (transformers + PEFT);
- ``merged``: the base with the adapter merged in, as safetensors (any HF runtime,
  and the input of MLC / ExecuTorch / llama.cpp's own converters);
- ``gguf``: a GGUF LoRA adapter that llama.cpp (and its phone wrappers) apply to the
  GGUF base the run started from (:mod:`fedtune.models.gguf_lora`);
- ``onnx``: the merged model as an ONNX graph (input ids and attention mask in, logits
  out) for ONNX Runtime (Mobile).

Every format is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from fedtune.errors import FedtuneError
from fedtune.metrics import atomic_directory

FORMATS = ("peft", "merged", "gguf", "onnx")


def load_run(run_dir: Path) -> tuple[Any, Any]:
    """The run's scenario and its PEFT model (fp32 base, the run's final adapter)."""
    from peft import PeftModel

    from fedtune.config import load_scenario
    from fedtune.models.base import load_base_model

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter"
    if not (run_dir / "scenario.toml").is_file() or not (adapter / "adapter_config.json").is_file():
        raise FedtuneError(
            f"{run_dir} is not a finished run folder (needs scenario.toml and adapter/): "
            "pass the --out folder of `fedtune simulate` or `fedtune serve`"
        )
    scenario = load_scenario(run_dir / "scenario.toml")
    m = scenario.model
    # Exports start from the full-precision base: a quantized run's adapter is merged
    # into the fp32 weights the quantized ones approximate.
    base = load_base_model(
        m.name, "fp32", m.num_layers, "none", m.trust_remote_code, m.task, m.num_labels
    )
    return scenario, PeftModel.from_pretrained(base, adapter).eval()


EXPORTS_OF_TASK = {
    "causal-lm": FORMATS,
    "seq-cls": ("peft", "merged", "onnx"),
    "seq2seq": ("peft", "merged"),
}
"""``model.task`` -> the formats it exports to: a GGUF LoRA adapter applies to a GGUF
causal LM only, and the ONNX graph is ``(input_ids, attention_mask) -> logits``, which
a seq2seq model's decoder cannot be."""


def export_run(run_dir: Path, fmt: str, out: Path | None = None) -> Path:
    """Write ``run_dir``'s adapter as ``fmt`` to ``out`` (default ``run_dir/export-<fmt>``)."""
    if fmt not in FORMATS:
        raise FedtuneError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / f"export-{fmt}"
    if out.exists() and any(out.iterdir()):
        raise FedtuneError(f"{out} is not empty: choose another --out")
    scenario, model = load_run(run_dir)
    task = scenario.model.task
    if fmt not in EXPORTS_OF_TASK[task]:
        raise FedtuneError(
            f"--format {fmt} cannot hold a model.task = {task!r} run: use one of "
            f"{', '.join(EXPORTS_OF_TASK[task])}"
        )
    with atomic_directory(out) as tmp:
        if fmt == "peft":
            shutil.copytree(run_dir / "adapter", tmp, dirs_exist_ok=True)
        elif fmt == "merged":
            write_merged(model, scenario.model.name, tmp)
        elif fmt == "gguf":
            from fedtune.models.gguf_lora import write_gguf_lora

            if scenario.model.num_layers:
                raise FedtuneError(
                    f"the run kept {scenario.model.num_layers} layers (model.num_layers): a GGUF "
                    "adapter applies to the full GGUF base, so export 'merged' or 'onnx' instead"
                )
            write_gguf_lora(model, tmp / "adapter.gguf", name=scenario.name)
        else:
            write_onnx(model.merge_and_unload(), tmp / "model.onnx")
            _save_tokenizer(scenario.model.name, tmp)
    return out


def _save_tokenizer(name: str, folder: Path) -> None:
    from fedtune.models.base import load_tokenizer

    load_tokenizer(name).save_pretrained(folder)


def write_merged(model: Any, name: str, folder: Path) -> None:
    """The base with the adapter merged in (PEFT's ``merge_and_unload``), safetensors."""
    merged = model.merge_and_unload()
    merged.save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(name, folder)


class _Logits(torch.nn.Module):
    """The model as ``(input_ids, attention_mask) -> logits`` (no cache, no loss)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits


def write_onnx(model: Any, path: Path, opset: int = 17) -> Path:
    """Export a causal LM (eager attention) to ONNX with dynamic batch and length.

    The TorchScript exporter (``dynamo=False``) is the one fedtune's on-device graphs
    already use with transformers 5; an explicit attention mask keeps ``aten::diff``
    out of the graph (see FACTS.md).
    """
    example = torch.ones(1, 8, dtype=torch.long)
    dynamic = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            _Logits(model.eval()),
            (example, torch.ones_like(example)),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "logits": dynamic},
            opset_version=opset,
            dynamo=False,
        )
    return path
