"""``model.task``: the task types and the rules between them and the rest of a scenario.

Kept apart from :mod:`fedtune.models.tasks` (the auto classes, PEFT's task types, the
classification head) so that loading a scenario imports nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.config import Scenario

CAUSAL_LM, SEQ_CLS, SEQ2SEQ = "causal-lm", "seq-cls", "seq2seq"
"""Values of ``model.task`` (:data:`fedtune.config.TASKS`)."""
TINY_NAMES = ("tiny-llama", "tiny-qwen2")
"""The built-in tiny models (``fedtune.models.base.TINY``), all causal LMs."""


def check_task(scenario: Scenario) -> None:
    """``model.task`` against the rest of the scenario (run when a scenario loads,
    importing nothing heavy): each rule names the key to change."""
    model, data = scenario.model, scenario.data
    task = model.task
    if task == CAUSAL_LM:
        return
    if model.name in TINY_NAMES:
        raise ConfigError(
            f"model.task = {task!r}: the built-in tiny models are causal LMs; set model.name "
            "to a folder holding an encoder (seq-cls) or an encoder-decoder (seq2seq)"
        )
    if model.quantization != "none":
        raise ConfigError(
            f"model.quantization = {model.quantization!r} quantizes causal LMs' decoders only; "
            f"set it to 'none' for model.task = {task!r}"
        )
    if scenario.gateway.enabled:
        raise ConfigError(
            f"[gateway]: phones train causal LMs (the ONNX Runtime artifacts take next-token "
            f"labels); model.task = {task!r} runs in simulation only: set gateway.enabled = false"
        )
    if scenario.evaluation.metrics:
        raise ConfigError(
            f"evaluation.metrics score a causal LM's generated answers; model.task = {task!r} "
            "is scored by its held-out loss (and accuracy for seq-cls): set "
            "evaluation.metrics = []"
        )
    if data.name not in ("files", "chatterbot"):
        raise ConfigError(
            f"model.task = {task!r} trains on labelled rows: set data.name = 'files' (with "
            "the data.*_column keys) or 'chatterbot'"
        )
    if task == SEQ_CLS and (not data.label_column or data.instruction):
        raise ConfigError(
            "model.task = 'seq-cls' classifies data.text_column into data.label_column: set "
            "data.label_column (and no data.prompt_column / data.messages_column)"
        )
    if task == SEQ2SEQ and not data.prompt_column:
        raise ConfigError(
            "model.task = 'seq2seq' maps data.prompt_column to data.response_column: set both "
            "(data.messages_column is for chat models)"
        )
