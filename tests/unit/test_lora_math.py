"""The LoRA-aware strategies' maths, with exact answers on tiny tensors."""

from __future__ import annotations

import pytest
import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedtune.strategies.lora_math import lora_part, select, unpack_replies, weighted_average
from fedtune.wire import from_record, to_record

A, B = "layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight"
OTHER = "layers.0.q_proj.lora_magnitude_vector"


def test_lora_part_by_name():
    assert lora_part(A) == "A"
    assert lora_part(B) == "B"
    assert lora_part("base_model.model.layers.3.v_proj.lora_B.default.weight") == "B"
    assert lora_part(OTHER) is None


def test_select_by_part():
    state = {A: torch.ones(1), B: torch.zeros(1), OTHER: torch.full((1,), 2.0)}
    assert list(select(state, ["A"])) == [A]
    assert list(select(state, ["B"])) == [B]
    assert sorted(select(state, ["A", None])) == sorted([A, OTHER])
    assert select(state, []) == {}
    assert select(state, ["B"])[B] is state[B]  # no copy


def test_weighted_average_is_exact():
    states = [
        {A: torch.tensor([1.0, 2.0]), B: torch.tensor([[4.0]])},
        {A: torch.tensor([3.0, 4.0]), B: torch.tensor([[0.0]])},
    ]
    out = weighted_average(states, [1, 3])
    assert torch.equal(out[A], torch.tensor([2.5, 3.5]))
    assert torch.equal(out[B], torch.tensor([[1.0]]))
    assert out[A].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_weighted_average_keeps_the_dtype(dtype):
    states = [{A: torch.ones(2, dtype=dtype)}, {A: torch.zeros(2, dtype=dtype)}]
    out = weighted_average(states, [1.0, 1.0])
    assert out[A].dtype == dtype
    assert torch.equal(out[A], torch.full((2,), 0.5, dtype=dtype))


def test_weighted_average_of_one_state_is_that_state():
    state = {A: torch.tensor([0.1, -0.3])}
    assert torch.equal(weighted_average([state], [7])[A], state[A])


def test_weighted_average_equals_flowers_fedavg_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    states = [
        {A: torch.randn(4, 8, generator=gen), B: torch.randn(8, 4, generator=gen)} for _ in "abc"
    ]
    weights = [2, 3, 4]
    records = [
        RecordDict({"arrays": to_record(s), "metrics": MetricRecord({"num-examples": w})})
        for s, w in zip(states, weights, strict=True)
    ]
    flower = from_record(aggregate_arrayrecords(records, "num-examples"))
    ours = weighted_average(states, weights)
    assert all(torch.equal(ours[k], flower[k]) for k in (A, B))


@pytest.mark.parametrize(
    ("states", "weights", "match"),
    [
        ([], [], "one weight per state"),
        ([{A: torch.ones(1)}], [1, 2], "one weight per state"),
        ([{A: torch.ones(1)}, {A: torch.ones(1)}], [0, 0], "sum to a positive"),
    ],
)
def test_weighted_average_refuses_bad_weights(states, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_average(states, weights)


def test_unpack_replies():
    contents = [
        RecordDict(
            {
                "arrays": to_record({A: torch.tensor([float(i)])}),
                "metrics": MetricRecord({"num-examples": 2 * i + 1, "loss": 0.5}),
            }
        )
        for i in range(2)
    ]
    states, weights = unpack_replies(contents, "arrays", "num-examples")
    assert weights == [1.0, 3.0]
    assert [s[A].tolist() for s in states] == [[0.0], [1.0]]
