from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedtune.wire import (
    check_update,
    dequantize_rows,
    encode_update,
    expected_specs,
    from_record,
    quantize_rows,
    recorddict_nbytes,
    to_record,
)


@pytest.fixture(autouse=True)
def task_identity():
    """Messages need a run identity; Flower sets one this way in its simulation."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (
        TaskIdentity._run_id,
        getattr(TaskIdentity, "_task_id", None),
        getattr(TaskIdentity, "_node_id", None),
    )
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


STATE = {"a.lora_A.weight": torch.arange(8.0).view(2, 4), "a.lora_B.weight": torch.ones(4, 2)}


def reply(arrays: ArrayRecord, metrics: dict | None = None) -> Message:
    metrics = {"num-examples": 4, "loss": 1.0} if metrics is None else metrics
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content, dst_node_id=1, message_type="train")


def check(message: Message, max_bytes: int = 10_000):
    return check_update(message, expected_specs(STATE), max_bytes)


def test_record_round_trip_is_exact():
    back = from_record(to_record(STATE))
    assert list(back) == sorted(STATE)
    for k in STATE:
        assert torch.equal(back[k], STATE[k])


def test_valid_update_passes():
    state, reason = check(reply(to_record(STATE)))
    assert reason is None and torch.equal(state["a.lora_B.weight"], STATE["a.lora_B.weight"])


def test_serialized_size_grows_with_payload():
    small = recorddict_nbytes(RecordDict({"arrays": to_record(STATE)}))
    big = recorddict_nbytes(
        RecordDict({"arrays": to_record({k: v.repeat(10, 1) for k, v in STATE.items()})})
    )
    payload = sum(v.numel() * 4 for v in STATE.values())
    assert small > payload
    assert big - small >= 9 * payload  # the arrays' bytes are all counted


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda s: {**s, "extra": torch.zeros(1)}, "keys differ"),
        (lambda s: {"a.lora_A.weight": s["a.lora_A.weight"]}, "keys differ"),
        (lambda s: {**s, "a.lora_B.weight": torch.ones(2, 4)}, "expected float32[4, 2]"),
        (lambda s: {**s, "a.lora_B.weight": torch.full((4, 2), float("nan"))}, "non-finite"),
        (lambda s: {**s, "a.lora_B.weight": torch.full((4, 2), float("inf"))}, "non-finite"),
    ],
)
def test_malformed_updates_are_rejected(mutate, reason):
    state, why = check(reply(to_record(mutate(dict(STATE)))))
    assert state is None and reason in why


def test_wrong_dtype_is_rejected():
    record = ArrayRecord({k: Array(v.numpy().astype(np.float64)) for k, v in STATE.items()})
    state, why = check(reply(record))
    assert state is None and "float64" in why


def test_oversized_update_is_rejected():
    state, why = check(reply(to_record(STATE)), max_bytes=16)
    assert state is None and "exceeds the bound" in why


@pytest.mark.parametrize("metrics", [{}, {"num-examples": 0}, {"num-examples": -3}])
def test_missing_or_bad_weight_is_rejected(metrics):
    state, why = check(reply(to_record(STATE), metrics))
    assert state is None and "num-examples" in why


def test_error_reply_is_rejected():
    # What Flower delivers when a ClientApp raises.
    sent = Message(RecordDict(), dst_node_id=1, message_type="train")
    state, why = check(Message(Error(code=0, reason="boom"), reply_to=sent))
    assert state is None and "client error: boom" in why


def test_reply_without_arrays_is_rejected():
    bad = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 1})}),
        dst_node_id=1,
        message_type="train",
    )
    state, why = check(bad)
    assert state is None and "no 'arrays'" in why


def test_fp16_wire_round_trip():
    record = encode_update(STATE, "fp16")
    assert all(record[k].dtype == "float16" for k in record)
    state, reason = check_update(reply(record), expected_specs(STATE), 10_000, "fp16")
    assert reason is None
    for k in STATE:
        assert state[k].dtype == torch.float32
        assert torch.equal(state[k], STATE[k].half().float())


def test_int8_rows_error_is_at_most_half_a_step():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(8, 33, generator=gen) * torch.logspace(-3, 1, 8)[:, None]
    q, scale = quantize_rows(t)
    assert q.dtype == torch.int8 and scale.shape == (8,)
    back = dequantize_rows(q, scale)
    assert bool(((back - t).abs() <= scale[:, None] / 2 + 1e-7).all())
    q, scale = quantize_rows(t.T)  # a tall matrix (LoRA B): one scale per column
    assert scale.shape == (8,)
    assert bool(((dequantize_rows(q, scale) - t.T).abs() <= scale[None, :] / 2 + 1e-7).all())
    assert torch.equal(dequantize_rows(*quantize_rows(torch.zeros(2, 3))), torch.zeros(2, 3))


def test_int8_wire_round_trip_and_size():
    big = {"w.lora_A.weight": torch.randn(8, 576), "w.lora_B.weight": torch.randn(576, 8)}
    specs = expected_specs(big)
    record = encode_update(big, "int8")
    assert sorted(record) == sorted([*big, *(k + "::scale" for k in big)])
    state, reason = check_update(reply(record), specs, 10**7, "int8")
    assert reason is None
    for k in big:
        small_side = 1 if big[k].shape[0] > big[k].shape[1] else 0
        step = big[k].abs().amax(dim=1 - small_side, keepdim=True) / 127
        assert bool(((state[k] - big[k]).abs() <= step / 2 + 1e-6).all())
    fp32 = recorddict_nbytes(RecordDict({"arrays": encode_update(big, "fp32")}))
    int8 = recorddict_nbytes(RecordDict({"arrays": record}))
    assert int8 < 0.3 * fp32


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda r: r.pop("a.lora_A.weight::scale"), "keys differ"),
        (
            lambda r: r.__setitem__("a.lora_B.weight", Array(np.zeros((4, 2), np.float32))),
            "expected int8[4, 2]",
        ),
        (
            lambda r: r.__setitem__("a.lora_B.weight::scale", Array(np.ones(4, np.float32))),
            "expected float32[2]",
        ),
        (
            lambda r: r.__setitem__(
                "a.lora_B.weight::scale", Array(np.full(2, np.inf, np.float32))
            ),
            "non-finite",
        ),
    ],
)
def test_malformed_int8_updates_are_rejected(mutate, reason):
    record = encode_update(STATE, "int8")
    mutate(record)
    state, why = check_update(reply(record), expected_specs(STATE), 10_000, "int8")
    assert state is None and reason in why


def test_fp32_update_on_an_int8_wire_is_rejected():
    state, why = check_update(reply(to_record(STATE)), expected_specs(STATE), 10_000, "int8")
    assert state is None and "keys differ" in why
