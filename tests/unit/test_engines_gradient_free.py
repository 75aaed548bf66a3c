"""The gradient-free engines (forward, zeroth) and the seed machinery, on tiny models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedtune.config import LoraConfig
from fedtune.engines import get_engine
from fedtune.engines.forward import check_forward_ad, directional_derivative
from fedtune.engines.seeds import (
    aggregate_steps,
    decode_steps,
    encode_steps,
    history_is_smaller,
    perturbation,
    replay,
    seed_pool,
    steps_nbytes,
)
from fedtune.errors import ConfigError
from fedtune.models import adapter_state, attach_lora, load_adapter_state, load_base_model

from ..conftest import engine_config

LORA = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def chunks(tokenizer):
    from fedtune.data import chunk_tokens

    return chunk_tokens(tokenizer, "To be, or not to be: that is the question.\n" * 40, 32)


def _loss(model, chunks: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=chunks, labels=chunks).loss)


def test_seed_pool_and_perturbation_are_fixed_by_their_seeds():
    assert seed_pool(0, 3) == [2968811710, 3677149159, 745650761]
    assert seed_pool(1, 3) != seed_pool(0, 3)
    z = perturbation(7, [("a", (2, 3)), ("b", (4,))])
    # The wire format of a perturbation: any platform must rebuild exactly these signs.
    assert z["a"].tolist() == [[1.0, 1.0, -1.0], [1.0, -1.0, -1.0]]
    assert z["b"].tolist() == [-1.0, 1.0, -1.0, 1.0]
    big = perturbation(3, [("w", (64, 9))])["w"]
    assert big.dtype == torch.float32 and set(big.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(big, perturbation(3, [("w", (64, 9))])["w"])
    assert not torch.equal(big, perturbation(4, [("w", (64, 9))])["w"])


def test_steps_round_trip_on_the_wire_in_a_few_bytes():
    from flwr.app import ConfigRecord, RecordDict

    from fedtune.wire import recorddict_nbytes

    steps = [(0, 1.5), (4095, -2.25e-3), (17, 0.0), (3, 123.456)]
    steps = decode_steps(encode_steps(steps))  # fp32 scalars from here on
    data = encode_steps(steps)
    assert decode_steps(data) == steps
    assert len(data) == steps_nbytes(4) == 32
    record = RecordDict({"seed-steps": ConfigRecord({"steps": data})})
    assert recorddict_nbytes(record) < 100  # vs FedKSeed's "under 18 KB"
    with pytest.raises(ValueError, match="8 bytes each"):
        decode_steps(data[:-1])


def test_history_is_smaller_than_the_adapter_until_it_is_not():
    state = {"a": torch.zeros(100), "b": torch.zeros(20, 5)}  # 200 values, 800 bytes fp32
    assert history_is_smaller(99, state)
    assert not history_is_smaller(100, state)
    assert not history_is_smaller(50, state, bytes_per_value=2.0)


def test_aggregate_steps_adds_scalars_of_a_seed_by_weight():
    merged = aggregate_steps([[(2, 1.0), (0, 4.0)], [(2, 3.0)]], weights=[3, 1])
    assert merged == [(0, 3.0), (2, 1.5)]
    state = {"x.lora_A.weight": torch.tensor([0.5, -1.0, 2.0, 0.25])}
    pool = seed_pool(0, 3)
    one = replay(state, [(2, 1.0), (0, 4.0)], pool, lr=0.1)
    two = replay(state, [(2, 3.0)], pool, lr=0.1)
    mean = replay(state, merged, pool, lr=0.1)
    key = "x.lora_A.weight"
    assert torch.allclose(mean[key], (3 * one[key] + two[key]) / 4)


@pytest.mark.parametrize(("dtype", "train_only"), [("fp32", "all"), ("bf16", "B")])
def test_replaying_the_seed_steps_rebuilds_the_zeroth_adapter_bit_for_bit(
    chunks, dtype, train_only
):
    model = attach_lora(load_base_model("tiny-llama", dtype), LORA, seed=0)
    start = adapter_state(model)
    config = engine_config(
        "zeroth", lr=1e-2, local_steps=6, batch_size=2, seed=3, run_seed=11, train_only=train_only
    )
    update = get_engine("zeroth").train(model, chunks, config)
    assert update.seed_steps is not None and len(update.seed_steps) == 6
    rebuilt = replay(start, update.seed_steps, seed_pool(11, config.num_seeds), 1e-2, train_only)
    for key in start:
        assert torch.equal(rebuilt[key], update.state[key]), key
        if train_only == "B" and "lora_A" in key:
            assert torch.equal(update.state[key], start[key]), key
        else:
            assert not torch.equal(update.state[key], start[key]), key
    held = adapter_state(model)  # the model ends on the final adapter too
    assert all(torch.equal(held[k], update.state[k]) for k in held)


def test_zeroth_proximal_term_enters_the_scalars_and_still_replays(tiny_peft, chunks):
    start = adapter_state(tiny_peft)
    plain = engine_config("zeroth", lr=3e-2, local_steps=3, batch_size=2, seed=2)
    first = get_engine("zeroth").train(tiny_peft, chunks, plain)
    load_adapter_state(tiny_peft, start)
    proximal = dataclasses.replace(plain, proximal_mu=10.0)
    update = get_engine("zeroth").train(tiny_peft, chunks, proximal)
    assert first.seed_steps[0] == update.seed_steps[0]  # at w_global the term is 0
    assert first.seed_steps[1:] != update.seed_steps[1:]
    rebuilt = replay(start, update.seed_steps, seed_pool(0, plain.num_seeds), 3e-2)
    assert all(torch.equal(rebuilt[k], update.state[k]) for k in start)


def test_jvp_matches_backprop_gradient_along_the_direction(tiny_peft, chunks):
    params = {n: p for n, p in sorted(tiny_peft.named_parameters()) if "lora_" in n}
    direction = perturbation(5, [(n, tuple(p.shape)) for n, p in params.items()])
    for p in params.values():
        p.requires_grad_(True)
    ids = chunks[:2]
    tiny_peft(input_ids=ids, labels=ids).loss.backward()
    expected = sum(float((p.grad * direction[n]).sum()) for n, p in params.items())
    for p in params.values():
        p.requires_grad_(False)
    point = {n: p.detach() for n, p in params.items()}
    _, slope = directional_derivative(tiny_peft, point, direction, ids, "jvp")
    assert slope == pytest.approx(expected, abs=1e-4)
    _, fd = directional_derivative(tiny_peft, point, direction, ids, "fd", eps=1e-3)
    assert fd == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize(
    ("engine", "settings"),
    [
        ("zeroth", {}),
        ("forward", {}),
        ("forward", {"forward_derivative": "fd"}),
    ],
)
def test_gradient_free_engines_lower_the_loss(tiny_peft, chunks, engine, settings):
    before = _loss(tiny_peft, chunks)
    config = engine_config(
        engine,
        lr=3e-2,
        local_steps=8,
        batch_size=2,
        perturbations=2,
        max_perturbations=2,
        **settings,
    )
    update = get_engine(engine).train(tiny_peft, chunks, config)
    after = _loss(tiny_peft, chunks)
    assert after < before - 0.02, (before, after)  # 10.84 -> 10.79..10.81 when written
    assert update.num_examples == 16


@pytest.mark.parametrize("engine", ["zeroth", "forward"])
def test_same_seed_same_update(tiny_peft, chunks, engine):
    start = adapter_state(tiny_peft)
    config = engine_config(
        engine, lr=1e-2, local_steps=2, batch_size=2, seed=5, perturbations=2, max_perturbations=2
    )
    first = get_engine(engine).train(tiny_peft, chunks, config)
    load_adapter_state(tiny_peft, start)
    second = get_engine(engine).train(tiny_peft, chunks, config)
    load_adapter_state(tiny_peft, start)
    other = get_engine(engine).train(tiny_peft, chunks, dataclasses.replace(config, seed=6))
    assert all(torch.equal(first.state[k], second.state[k]) for k in start)
    assert first.loss == second.loss and first.seed_steps == second.seed_steps
    assert any(not torch.equal(first.state[k], other.state[k]) for k in start)


def test_forward_variance_control_adds_directions_up_to_the_cap(tiny_peft, chunks):
    base = {"lr": 1e-3, "local_steps": 1, "batch_size": 2, "perturbations": 2}
    fixed = get_engine("forward").train(
        tiny_peft,
        chunks,
        engine_config("forward", **base, max_perturbations=5, variance_threshold=1e9),
    )
    assert fixed.metrics["perturbations-per-step"] == 2
    capped = get_engine("forward").train(
        tiny_peft,
        chunks,
        engine_config("forward", **base, max_perturbations=5, variance_threshold=0.0),
    )
    assert capped.metrics["perturbations-per-step"] == 5
    assert capped.metrics["forward-passes"] == 5
    assert capped.metrics["variance-mean"] > 0


@pytest.mark.parametrize("engine", ["zeroth", "forward"])
def test_train_only_leaves_the_other_factor_bit_for_bit(tiny_peft, chunks, engine):
    start = adapter_state(tiny_peft)
    config = engine_config(
        engine,
        lr=1e-2,
        local_steps=2,
        batch_size=2,
        train_only="B",
        perturbations=2,
        max_perturbations=2,
    )
    update = get_engine(engine).train(tiny_peft, chunks, config)
    for key in start:
        changed = not torch.equal(update.state[key], start[key])
        assert changed == ("lora_B" in key), key


@pytest.mark.parametrize(("quantization", "layer"), [("nf4", "Linear4bit"), ("int4", "HQQLinear")])
def test_forward_mode_on_an_unsupported_quantized_base_is_an_error(chunks, quantization, layer):
    pytest.importorskip({"nf4": "bitsandbytes", "int4": "hqq"}[quantization])
    model = attach_lora(load_base_model("tiny-llama", quantization=quantization), LORA, seed=0)
    start = adapter_state(model)
    config = engine_config("forward", lr=1e-2, local_steps=1, batch_size=2, perturbations=1)
    with pytest.raises(ConfigError, match=f"engine 'forward' does not work with .*{layer}"):
        get_engine("forward").train(model, chunks, config)
    assert all(torch.equal(start[k], v) for k, v in adapter_state(model).items())
    # Forward passes alone work on it: finite differences, and the zeroth engine.
    fd = dataclasses.replace(config, forward_derivative="fd", max_perturbations=1)
    assert get_engine("forward").train(model, chunks, fd).loss > 0
    zeroth = engine_config("zeroth", lr=1e-2, local_steps=1, batch_size=2)
    assert get_engine("zeroth").train(model, chunks, zeroth).loss > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_forward_mode_passes_through_torchao_int8(dtype):
    pytest.importorskip("torchao")
    model = attach_lora(load_base_model("tiny-llama", dtype, quantization="int8"), LORA, seed=0)
    check_forward_ad(model)


def test_zeroth_draws_seeds_with_fedkseed_pro_probabilities(tiny_peft, chunks):
    probabilities = [0.0] * 16
    probabilities[5] = 1.0  # every step must draw seed 5
    config = engine_config(
        "zeroth", lr=1e-3, local_steps=4, batch_size=2, num_seeds=16,
        seed_probabilities=tuple(probabilities),
    )  # fmt: skip
    update = get_engine("zeroth").train(tiny_peft, chunks, config)
    assert [index for index, _ in update.seed_steps] == [5, 5, 5, 5]
    with pytest.raises(ConfigError, match="3 seed probabilities for a pool of 16"):
        dataclasses.replace(config, seed_probabilities=(0.5, 0.25, 0.25))


def test_zeroth_refuses_weight_decay(tiny_peft, chunks):
    config = engine_config("zeroth", lr=1e-2, local_steps=1, batch_size=2, weight_decay=0.1)
    with pytest.raises(ConfigError, match="engine 'zeroth' applies no weight decay"):
        get_engine("zeroth").train(tiny_peft, chunks, config)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"eps": 0.0}, "eps must be positive"),
        ({"num_seeds": 0}, "num-seeds must be at least 1"),
        ({"perturbations": 5, "max_perturbations": 4}, "perturbations <= max-perturbations"),
        ({"variance_threshold": -1.0}, "variance-threshold must be >= 0"),
        ({"forward_derivative": "vjp"}, "forward-derivative must be one of jvp, fd"),
        ({"forward_optimizer": "adam"}, "forward-optimizer must be one of sgd, adamw"),
    ],
)
def test_bad_gradient_free_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        engine_config(
            "zeroth" if "num_seeds" in settings else "forward",
            lr=1e-2,
            local_steps=1,
            batch_size=1,
            **settings,
        )
