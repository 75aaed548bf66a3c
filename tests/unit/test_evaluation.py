"""Scores beyond perplexity: per-client perplexity, generation metrics, the registry."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.config import load_scenario
from fedtune.data import build_population
from fedtune.data.instruct import prompt_and_reference
from fedtune.errors import ConfigError
from fedtune.evaluation import Evaluator, generate_answers, worst_decile
from fedtune.report import write_report
from fedtune.scores import exact_match, get_metric, normalize, rouge_l


def test_worst_decile_is_the_mean_of_the_worst_tenth():
    assert worst_decile([1.0, 2.0, 3.0]) == 3.0  # at least one client
    assert worst_decile([float(v) for v in range(1, 21)]) == 19.5  # the worst 2 of 20
    assert worst_decile([float(v) for v in range(1, 12)]) == 10.5  # ceil(11/10) = 2


def test_exact_match_normalises_like_squad():
    assert normalize("The  Cancer!") == "cancer"
    assert exact_match(["the cancer.", "water"], ["Cancer", "H2O"]) == 0.5


def test_rouge_l_is_the_lcs_f_measure():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == 1.0
    # LCS "the cat" of 3 and 4 tokens: P = 2/3, R = 2/4, F = 4/7.
    assert rouge_l(["the cat sat"], ["the big cat ran"]) == pytest.approx(4 / 7)
    assert rouge_l(["zebra"], ["the cat"]) == 0.0


def test_metrics_are_found_by_registered_name():
    assert get_metric("rouge-l") is rouge_l
    with pytest.raises(ConfigError, match="unknown evaluation.metrics name 'bleu'.*exact-match"):
        get_metric("bleu")


def test_greedy_answers_are_deterministic_and_match_argmax(tiny_peft, tokenizer):
    prompt, _ = prompt_and_reference(tokenizer, (("user", "hi"), ("assistant", "hello")))
    short = prompt[-6:]
    answers = generate_answers(tiny_peft, tokenizer, [prompt, short], max_new_tokens=5)
    assert answers == generate_answers(tiny_peft, tokenizer, [prompt, short], max_new_tokens=5)
    # Left padding does not change an answer: alone, the short prompt gives the same.
    assert generate_answers(tiny_peft, tokenizer, [short], max_new_tokens=5) == answers[1:]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, tiny_peft(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert answers[0] == tokenizer.decode(ids[0, len(prompt) :], skip_special_tokens=True).strip()


TINY = [
    "model.name=tiny-llama",
    "lora.r=4",
    "lora.alpha=8",
    "evaluation.examples=4",
    "evaluation.max_new_tokens=4",
    "evaluation.clients=5",
    "data.eval_chunks=4",
]


def test_the_evaluator_scores_clients_and_generations(tiny_peft, tokenizer):
    scenario = load_scenario("instruct", TINY)
    population = build_population(scenario.data)
    evaluator = Evaluator.build(scenario, tokenizer, population)
    assert len(evaluator.client_sets) == 5 and len(evaluator.prompts) == 4
    again = Evaluator.build(scenario, tokenizer, population)  # the same clients every run
    assert sorted(again.client_sets) == sorted(evaluator.client_sets)
    scores = evaluator.scores(tiny_peft)
    per = scores["client_perplexity"]
    assert len(per) == 5
    assert scores["client_perplexity_mean"] == pytest.approx(sum(per.values()) / 5)
    assert scores["client_perplexity_worst_decile"] == max(per.values())
    assert 0.0 <= scores["rouge_l"] <= 1.0 and 0.0 <= scores["exact_match"] <= 1.0


def test_generation_metrics_need_instruction_data():
    scenario = load_scenario("tiny", ["evaluation.metrics=['rouge-l']"])
    with pytest.raises(ConfigError, match="need instruction data"):
        Evaluator.build(scenario, None, build_population(scenario.data))


def test_the_report_shows_per_client_and_generation_scores(tmp_path):
    rows = [
        {"event": "round", "round": 0, "perplexity": 9.0, "client_perplexity_mean": 10.0,
         "client_perplexity_worst_decile": 20.0, "client_perplexity": {"0": 10.0}, "rouge_l": 0.1},
        {"event": "round", "round": 1, "status": "ok", "perplexity": 8.0,
         "client_perplexity_mean": 9.0, "client_perplexity_worst_decile": 15.0,
         "client_perplexity": {"0": 9.0}, "rouge_l": 0.2, "train_loss": 1.5},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path).read_text()
    assert "| round | client perplexity: mean | worst decile | clients | rouge_l |" in report
    assert "| 1 | 9.000 | 15.000 | 1 | 0.2000 |" in report
