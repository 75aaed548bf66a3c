"""Scores of the global adapter: held-out perplexity (on token chunks or labelled
rows), per-client perplexity on each client's own held-out part, generation metrics
with deterministic decoding, and a classifier's accuracy (see ``docs/evaluation.md``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedtune.data.instruct import LabelledChunks, Tokens, batch_parts, predicted_tokens
from fedtune.data.partition import SPLIT_SEED
from fedtune.data.population import (
    Population,
    client_holdout_chunks,
    eval_chunks,
    generation_examples,
)
from fedtune.errors import ConfigError, DataError
from fedtune.scores import Metric, get_metric

if TYPE_CHECKING:
    from fedtune.config import Scenario


@torch.inference_mode()
def perplexity(model: Any, chunks: Tokens, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every predicted token of ``chunks``.

    Each batch's mean loss is weighted by its number of predicted tokens to get the
    exact token mean; for labelled rows (instruction data) only response tokens count.
    For ``model.task = "seq2seq"`` it is over target tokens; for ``"seq-cls"``, exp of
    the mean cross-entropy per row over the classes (1 is a sure, right classifier;
    the number of classes is a uniform guess).
    """
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start : start + batch_size]
        input_ids, attention_mask, labels = batch_parts(batch)
        count = predicted_tokens(batch)
        if count == 0:
            continue
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        total += float(loss) * count
        tokens += count
    if was_training:
        model.train()
    return math.exp(total / tokens) if tokens else math.nan


@torch.inference_mode()
def accuracy(model: Any, rows: LabelledChunks, batch_size: int = 8) -> float:
    """The share of ``rows`` (``seq-cls``: one class label each) whose highest logit is
    their label."""
    was_training = model.training
    model.eval()
    right = 0
    for start in range(0, len(rows), batch_size):
        input_ids, attention_mask, labels = batch_parts(rows[start : start + batch_size])
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        right += int((logits.argmax(dim=-1) == labels).sum())
    if was_training:
        model.train()
    return right / len(rows) if len(rows) else math.nan


def worst_decile(values: Sequence[float]) -> float:
    """Mean of the worst (highest) tenth of ``values``, at least one value: the
    fairness figure of per-client perplexity."""
    worst = sorted(values, reverse=True)[: max(1, math.ceil(len(values) / 10))]
    return sum(worst) / len(worst)


@torch.inference_mode()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers to ``prompts`` (token ids): deterministic decoding (no sampling,
    one beam), stopped at the tokenizer's end-of-sequence token, special tokens dropped.

    Prompts are left-padded so every row's answer starts at the same column."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start : start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    if was_training:
        model.train()
    return answers


def check_evaluation(scenario: Scenario) -> None:
    """``[evaluation]`` against the data and the registry (preflight runs it)."""
    if scenario.evaluation.metrics and not scenario.data.instruction:
        raise ConfigError(
            "evaluation.metrics score generated answers, which need instruction data: "
            "set data.prompt_column and data.response_column, or data.messages_column"
        )
    for name in scenario.evaluation.metrics:
        get_metric(name)


@dataclass
class Evaluator:
    """What the server scores after a round besides the global held-out perplexity
    (``[evaluation]``): each sampled training client's own held-out part, generation
    metrics on held-out instruction examples, and (``model.task = "seq-cls"``) the
    accuracy on the global held-out rows. Built once per run."""

    client_sets: dict[int, Tokens]
    """Client index -> its held-out tail, tokenized as it trains."""
    prompts: list[tuple[list[int], str]]
    """(prompt ids, reference answer) of the generation metrics."""
    metrics: dict[str, Metric]
    """Metric name -> the registered callable."""
    tokenizer: Any
    batch_size: int
    max_new_tokens: int
    generate_batch: int
    classified: LabelledChunks | None = None
    """``seq-cls``: the global held-out rows the accuracy is taken on."""

    @classmethod
    def build(cls, scenario: Scenario, tokenizer: Any, population: Population) -> Evaluator:
        """The evaluator of ``scenario``: the per-client sets and the generation prompts."""
        cfg, data = scenario.evaluation, scenario.data
        check_evaluation(scenario)
        picked: list[int] = []
        if cfg.clients:
            # The same clients in every run and round: the data's fixed seed picks them.
            order = np.random.default_rng(SPLIT_SEED).permutation(len(population.train))
            picked = sorted(int(i) for i in order[: cfg.clients])
        task, seq_len = scenario.model.task, scenario.client.seq_len
        sets = {
            i: client_holdout_chunks(tokenizer, population.train[i], data, seq_len, task)
            for i in picked
        }
        classified = None
        if task == "seq-cls":
            classified = eval_chunks(tokenizer, population, data, seq_len, task)
            assert isinstance(classified, LabelledChunks)  # every seq-cls set is labelled
        sets = {i: s for i, s in sets.items() if len(s)}
        if cfg.clients and not sets:
            raise DataError(
                "evaluation.clients: no sampled client has a held-out part: raise "
                "data.local_holdout or data.min_chars"
            )
        return cls(
            client_sets=sets,
            prompts=generation_examples(tokenizer, population, cfg.examples) if cfg.metrics else [],
            metrics={name: get_metric(name) for name in cfg.metrics},
            tokenizer=tokenizer,
            batch_size=scenario.run.eval_batch_size,
            max_new_tokens=cfg.max_new_tokens,
            generate_batch=cfg.batch_size,
            classified=classified,
        )

    def scores(self, model: Any) -> dict[str, Any]:
        """The fields this evaluator adds to a ``round`` event, for ``model`` as loaded:
        ``client_perplexity_mean``, ``client_perplexity_worst_decile`` and
        ``client_perplexity`` (index -> value), one field per generation metric, and
        ``accuracy`` (``seq-cls``)."""
        out: dict[str, Any] = {}
        if self.classified is not None:
            out["accuracy"] = accuracy(model, self.classified, self.batch_size)
        if self.client_sets:
            per = {i: perplexity(model, s, self.batch_size) for i, s in self.client_sets.items()}
            values = list(per.values())
            out["client_perplexity_mean"] = sum(values) / len(values)
            out["client_perplexity_worst_decile"] = worst_decile(values)
            out["client_perplexity"] = {str(i): v for i, v in per.items()}
        if self.metrics:
            answers = generate_answers(
                model,
                self.tokenizer,
                [p for p, _ in self.prompts],
                self.max_new_tokens,
                self.generate_batch,
            )
            references = [r for _, r in self.prompts]
            for name, metric in self.metrics.items():
                out[name.replace("-", "_")] = float(metric(answers, references))
        return out
