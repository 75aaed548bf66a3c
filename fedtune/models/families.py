"""Loading a Hugging Face folder safely: remote code only when allowed, no new weights.

Two ways a folder can make the server and the clients train different models are
refused here: code shipped inside the folder (``auto_map`` in ``config.json``, the
Hub's "remote code") runs only under ``model.trust_remote_code = true``; and a load
that leaves any weight newly initialized (a checkpoint missing, say, BART's decoder
embeddings) is an error, because transformers fills such weights with unseeded random
values, different in every process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError, ModelError


def check_remote_code(folder: Path, allowed: bool) -> bool:
    """Whether ``folder`` needs its own code; refuse it unless ``allowed``."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {folder}/config.json: {exc}") from exc
    from transformers import CONFIG_MAPPING

    needs = "auto_map" in config or config.get("model_type") not in CONFIG_MAPPING
    if needs and not allowed:
        raise ConfigError(
            f"{folder} holds its own model code (auto_map in config.json, model type "
            f"{config.get('model_type')!r}), which fedtune does not run by default: read it, "
            "then set 'model.trust_remote_code = true' in [model] (or --set "
            "model.trust_remote_code=true) to allow it"
        )
    return needs


def load_pretrained(
    folder: Path,
    trust_remote_code: bool = False,
    task: str = "causal-lm",
    num_labels: int = 0,
    **kwargs: Any,
) -> Any:
    """``from_pretrained(folder)`` with ``task``'s auto class, refusing newly initialized
    weights; a classification head (which no encoder checkpoint holds) is initialized
    from a fixed seed instead (:func:`fedtune.models.tasks.init_head`)."""
    from fedtune.models.tasks import auto_class, head_keys, init_head, load_kwargs

    remote = check_remote_code(folder, trust_remote_code)
    try:
        model, info = auto_class(task).from_pretrained(
            folder,
            output_loading_info=True,
            trust_remote_code=remote,
            **load_kwargs(task, num_labels),
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model from {folder}: {exc}") from exc
    missing = sorted(info.get("missing_keys") or [])
    if task == "seq-cls":
        head = head_keys(model, missing)
        init_head(model, head)
        missing = [k for k in missing if k not in head]
    if missing:
        raise ModelError(
            f"{folder} lacks {len(missing)} weight(s) of {type(model).__name__} (e.g. "
            f"{', '.join(missing[:3])}); transformers would fill them with unseeded random "
            "values, different in every process: complete the checkpoint"
        )
    return model


# ------------------------------------------------- the families of the mobile-LLM list

CAUSAL = "causal LM"
SEQ_CLS = "sequence classification"
SEQ2SEQ = "seq2seq"


@dataclass(frozen=True)
class Family:
    """One family of the "Awesome Mobile LLMs" list and how fedtune meets it."""

    name: str
    """The family's name as the list writes it."""
    config_cls: str
    """The transformers config class of its open checkpoints ("" when there is none)."""
    task: str
    """What its checkpoints are: a causal LM, an encoder (sequence classification) or
    an encoder-decoder (seq2seq)."""
    note: str = ""
    """Why it has no transformers class, or how its checkpoints map to one."""


_REMOTE = "Hub remote code only: loads from a local folder with model.trust_remote_code"

# The 47 rows of the list's "Mobile-First LLMs" table, in its order.
FAMILIES: tuple[Family, ...] = (
    Family("SmolLM3", "SmolLM3Config", CAUSAL),
    Family("Qwen-3", "Qwen3Config", CAUSAL),
    Family("Pareto-Q", "", CAUSAL, _REMOTE + " (MobileLLM architecture)"),
    Family("BlueLM-V", "", CAUSAL, "no open checkpoint on the Hub (multimodal)"),
    Family("PhoneLM", "", CAUSAL, _REMOTE),
    Family("AMD-Llama-135m", "LlamaConfig", CAUSAL),
    Family("SmolLM2", "LlamaConfig", CAUSAL, "the real model `smollm2-135m` too"),
    Family("Ministral", "MinistralConfig", CAUSAL),
    Family("Llama 3.2", "LlamaConfig", CAUSAL),
    Family("OLMoE", "OlmoeConfig", CAUSAL),
    Family("Spectra", "LlamaConfig", CAUSAL, "the unpacked FloatLM/TriLM checkpoints"),
    Family("Gemma 2", "Gemma2Config", CAUSAL),
    Family("Apple Intelligence Foundation LMs", "", CAUSAL, "closed weights"),
    Family("SmolLM", "LlamaConfig", CAUSAL),
    Family("Fox", "LlamaConfig", CAUSAL),
    Family("Qwen2", "Qwen2Config", CAUSAL),
    Family("OpenELM", "", CAUSAL, _REMOTE),
    Family("DCLM", "", CAUSAL, "needs the open_lm package (no transformers class)"),
    Family("Phi-3", "Phi3Config", CAUSAL),
    Family("BitNet-b1.58", "BitNetConfig", CAUSAL),
    Family("OLMo", "OlmoConfig", CAUSAL),
    Family("Mobile LLMs", "", CAUSAL, _REMOTE + " (MobileLLM)"),
    Family("Gemma", "GemmaConfig", CAUSAL, "Gemma 3 (`gemma3-270m`) as Gemma3TextConfig"),
    Family("MobiLlama", "", CAUSAL, _REMOTE),
    Family("Stable LM 2 (Zephyr)", "StableLmConfig", CAUSAL),
    Family("TinyLlama", "LlamaConfig", CAUSAL),
    Family("Gemini-Nano", "", CAUSAL, "closed weights"),
    Family("Stable LM (Zephyr)", "StableLmConfig", CAUSAL),
    Family("OpenLM", "", CAUSAL, "needs the open_lm package (no transformers class)"),
    Family("Phi-2", "PhiConfig", CAUSAL),
    Family("Phi-1.5", "PhiConfig", CAUSAL),
    Family("Phi-1", "PhiConfig", CAUSAL),
    Family("RWKV", "RwkvConfig", CAUSAL, "RWKV-4 (later versions are remote code)"),
    Family("Cerebras-GPT", "GPT2Config", CAUSAL),
    Family("OPT", "OPTConfig", CAUSAL),
    Family("LaMini-LM", "GPT2Config", CAUSAL, "LaMini-GPT; LaMini-T5/Flan-T5 are seq2seq"),
    Family("Pythia", "GPTNeoXConfig", CAUSAL),
    Family("Galactica", "OPTConfig", CAUSAL),
    Family("BLOOM", "BloomConfig", CAUSAL),
    Family("XGLM", "XGLMConfig", CAUSAL),
    Family("GPT-Neo", "GPTNeoConfig", CAUSAL),
    Family("MobileBERT", "MobileBertConfig", SEQ_CLS),
    Family("BART", "BartConfig", CAUSAL, "its decoder as BartForCausalLM"),
    Family("DistilBERT", "DistilBertConfig", SEQ_CLS),
    Family("T5", "T5Config", SEQ2SEQ),
    Family("TinyBERT", "BertConfig", SEQ_CLS),
    Family("Megatron-LM", "GPT2Config", CAUSAL, "its GPT checkpoints convert to GPT-2"),
)

# Sizes of a tiny random model: every config class takes these standard names (its
# attribute_map turns them into n_embd, n_layer, ... where it names them otherwise).
TINY_SIZES: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
# What a class needs beyond (or instead of) TINY_SIZES to build small and run.
TINY_EXTRA: dict[str, dict[str, Any]] = {
    "OlmoeConfig": dict(num_experts=4, num_experts_per_tok=2),
    "RwkvConfig": dict(attention_hidden_size=64, context_length=512),
    "BartConfig": dict(
        d_model=64,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=128,
        encoder_layers=1,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
    ),
    "GPTNeoConfig": dict(attention_types=[[["global", "local"], 1]], window_size=64),
    "OPTConfig": dict(ffn_dim=128, word_embed_proj_dim=64),
    "XGLMConfig": dict(d_model=64, ffn_dim=128, attention_heads=4, num_layers=2),
    "BloomConfig": dict(n_head=4, n_layer=2),
    "StableLmConfig": dict(partial_rotary_factor=0.5),
    "PhiConfig": dict(partial_rotary_factor=0.5),
    "MinistralConfig": dict(head_dim=16),
    # Real T5 checkpoints name the decoder's start token (the pad id) in config.json.
    "T5Config": dict(d_ff=128, d_kv=16, decoder_start_token_id=0),
}


def tiny_config(config_cls: str, vocab_size: int) -> Any:
    """A small random configuration of ``config_cls``, eager attention (ONNX-exportable)."""
    import transformers

    cls = getattr(transformers, config_cls)
    config = cls(vocab_size=vocab_size, **{**TINY_SIZES, **TINY_EXTRA.get(config_cls, {})})
    # Token ids of the real checkpoints (SmolLM3's pad 128004) lie outside a tiny vocab.
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= vocab_size:
            setattr(config, key, None)
    config._attn_implementation = "eager"
    return config
