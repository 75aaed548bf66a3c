from __future__ import annotations

import pytest
import torch

from fedtune.engines import get_engine, sample_batches
from fedtune.errors import ConfigError
from fedtune.models import adapter_state, load_adapter_state

from ..conftest import engine_config


def test_sample_batches_is_seeded_and_covers_chunks():
    a = sample_batches(5, 2, 6, seed=1)
    assert [t.tolist() for t in a] == [t.tolist() for t in sample_batches(5, 2, 6, seed=1)]
    assert [t.tolist() for t in a] != [t.tolist() for t in sample_batches(5, 2, 6, seed=2)]
    seen = [i for t in a[:2] for i in t.tolist()] + a[2].tolist()[:1]
    assert sorted(seen) == [0, 1, 2, 3, 4]  # the first epoch is a permutation


def test_unknown_engine():
    with pytest.raises(ConfigError, match="unknown client.engine 'sgd'"):
        get_engine("sgd")


def test_backprop_lowers_loss_and_only_trains_lora(tiny_peft, tokenizer):
    from fedtune.data import chunk_tokens

    chunks = chunk_tokens(tokenizer, "To be, or not to be: that is the question.\n" * 40, 32)
    frozen = {n: p.clone() for n, p in tiny_peft.named_parameters() if "lora_" not in n}
    start = adapter_state(tiny_peft)
    update = get_engine("backprop").train(
        tiny_peft, chunks, engine_config("backprop", lr=1e-2, local_steps=8, batch_size=2, seed=0)
    )
    assert update.metrics["loss-last"] < update.metrics["loss-first"]
    assert update.num_examples == 16
    assert any(not torch.equal(update.state[k], start[k]) for k in start)
    for n, p in tiny_peft.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n]), n
            assert not p.requires_grad


def test_backprop_is_deterministic(tiny_peft, tokenizer):
    from fedtune.data import chunk_tokens

    chunks = chunk_tokens(tokenizer, "Words, words, words. " * 80, 32)
    start = adapter_state(tiny_peft)
    cfg = engine_config("backprop", lr=1e-2, local_steps=3, batch_size=2, seed=5)
    first = get_engine("backprop").train(tiny_peft, chunks, cfg)
    load_adapter_state(tiny_peft, start)
    second = get_engine("backprop").train(tiny_peft, chunks, cfg)
    assert all(torch.equal(first.state[k], second.state[k]) for k in start)
    assert first.loss == second.loss


@pytest.mark.parametrize(("train_only", "frozen"), [("B", "lora_A"), ("A", "lora_B")])
def test_backprop_trains_only_the_factor_asked_for(tiny_peft, tokenizer, train_only, frozen):
    from fedtune.data import chunk_tokens

    chunks = chunk_tokens(tokenizer, "Words, words, words. " * 80, 32)
    sent = adapter_state(tiny_peft)
    config = engine_config(
        "backprop",
        lr=1e-2,
        local_steps=3,
        batch_size=2,
        seed=1,
        weight_decay=0.1,
        train_only=train_only,
    )
    update = get_engine("backprop").train(tiny_peft, chunks, config)
    assert any(frozen in k for k in sent)
    for key in sent:
        if frozen in key:
            assert torch.equal(update.state[key], sent[key]), key  # bit for bit
        else:
            assert not torch.equal(update.state[key], sent[key]), key
    assert not any(p.requires_grad for p in tiny_peft.parameters())


def test_bad_train_only_is_refused():
    with pytest.raises(ConfigError, match="lora-train must be one of all, A, B, got 'b'"):
        engine_config("backprop", lr=1e-2, local_steps=1, batch_size=1, train_only="b")
