"""Adapters on the wire: Flower records, compression, measured size, update validation.

The server checks every reply against the adapter it sent *before* a strategy sees it
(Flower's FedAvg ends the whole run when one reply's keys differ): a bad phone's reply
is dropped with a reason, and the round goes on.

Uploads may be compressed (``client.wire_dtype``): ``fp16`` halves them; ``int8``
stores int8 values with one fp32 scale per row or column (``<key>::scale``; one per
rank for LoRA matrices): a quarter of fp32 plus the scales, with an error of at most
half a scale step per value. The server decodes to fp32 while validating, so
strategies always see fp32 arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedtune.models.lora import AdapterState
from fedtune.protocol import ARRAYS_KEY, METRICS_KEY, SEEDS_KEY, WEIGHT_KEY

WIRE_DTYPES = ("fp32", "fp16", "int8")
SCALE_SUFFIX = "::scale"


def to_record(state: AdapterState) -> ArrayRecord:
    """An adapter state dict as an :class:`ArrayRecord` (fp32, sorted keys)."""
    return ArrayRecord(
        {k: state[k].detach().to("cpu", torch.float32).contiguous() for k in sorted(state)}
    )


def from_record(record: ArrayRecord) -> AdapterState:
    """An :class:`ArrayRecord` back to a state dict of CPU tensors."""
    return {k: torch.from_numpy(np.array(record[k].numpy(), copy=True)) for k in record}


def _scale_axis(shape: tuple[int, ...]) -> int:
    """Scales go along the smaller of a matrix's two sides: for LoRA that is the rank,
    so A (r x in) and B (out x r) both get r scales rather than B getting ``out``."""
    return 1 if len(shape) == 2 and shape[1] < shape[0] else 0


def quantize_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per row (per column where columns are fewer)."""
    t = tensor.detach().to(torch.float32)
    if _scale_axis(tuple(t.shape)) == 1:
        q, scale = quantize_rows(t.T.contiguous())
        return q.T.contiguous(), scale
    rows = t.reshape(t.shape[0] if t.dim() else 1, -1)
    scale = rows.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(t.shape), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` (up to half a scale step per value)."""
    if _scale_axis(tuple(q.shape)) == 1:
        return dequantize_rows(q.T.contiguous(), scale).T.contiguous()
    rows = q.to(torch.float32).reshape(q.shape[0] if q.dim() else 1, -1) * scale[:, None]
    return rows.reshape(q.shape)


def scale_count(shape: tuple[int, ...]) -> int:
    if not shape:
        return 1
    return shape[_scale_axis(shape)]


def encode_update(state: AdapterState, wire_dtype: str) -> ArrayRecord:
    """A client's update as it travels: fp32, fp16, or int8 with per-row scales."""
    if wire_dtype == "fp32":
        return to_record(state)
    if wire_dtype == "fp16":
        return ArrayRecord(
            {k: state[k].detach().to(torch.float16).contiguous() for k in sorted(state)}
        )
    if wire_dtype == "int8":
        arrays: dict[str, torch.Tensor] = {}
        for key in sorted(state):
            arrays[key], arrays[key + SCALE_SUFFIX] = quantize_rows(state[key])
        return ArrayRecord(arrays)
    raise ValueError(f"unknown wire dtype {wire_dtype!r}; use one of {WIRE_DTYPES}")


def _wire_specs(expected: Mapping[str, ArraySpec], wire_dtype: str) -> dict[str, ArraySpec]:
    """What the arrays of an update must look like on the wire."""
    if wire_dtype == "fp32":
        return dict(expected)
    if wire_dtype == "fp16":
        return {k: ArraySpec(s.shape, "float16") for k, s in expected.items()}
    specs = {}
    for key, spec in expected.items():
        specs[key] = ArraySpec(spec.shape, "int8")
        specs[key + SCALE_SUFFIX] = ArraySpec((scale_count(spec.shape),), "float32")
    return specs


def _decode(
    record: ArrayRecord, expected: Mapping[str, ArraySpec], wire_dtype: str
) -> AdapterState:
    raw = from_record(record)
    if wire_dtype == "int8":
        return {k: dequantize_rows(raw[k], raw[k + SCALE_SUFFIX]) for k in expected}
    return {k: raw[k].to(torch.float32) for k in expected}


def recorddict_nbytes(content: RecordDict) -> int:
    """Bytes of ``content`` serialized as Flower sends it (protobuf)."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(content).ByteSize())


@dataclass(frozen=True)
class ArraySpec:
    """What each array of a valid update must look like."""

    shape: tuple[int, ...]
    dtype: str = "float32"


def expected_specs(state: AdapterState) -> dict[str, ArraySpec]:
    return {
        k: ArraySpec(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()
    }


def check_update(
    message: Message, expected: Mapping[str, ArraySpec], max_bytes: int, wire_dtype: str = "fp32"
) -> tuple[AdapterState | None, str | None]:
    """Validate one training reply and decode its update to fp32.

    Returns ``(state, None)`` for a valid update, or ``(None, reason)``: an error reply,
    a missing or extra record, a key, shape or dtype that differs from what was sent
    (encoded as ``wire_dtype``), a non-finite value, a missing or non-positive example
    count, or more than ``max_bytes`` of arrays.
    """
    if message.has_error():
        return None, client_error(message)
    content = message.content
    if ARRAYS_KEY not in content.array_records:
        return None, f"no '{ARRAYS_KEY}' array record"
    if METRICS_KEY not in content.metric_records:
        return None, f"no '{METRICS_KEY}' metric record"
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return None, "expected exactly one array record and one metric record"
    weight = content.metric_records[METRICS_KEY].get(WEIGHT_KEY)
    if not isinstance(weight, int | float) or not weight > 0:
        return None, f"'{WEIGHT_KEY}' missing or not positive: {weight!r}"
    record = content.array_records[ARRAYS_KEY]
    wire = _wire_specs(expected, wire_dtype)
    keys, want = set(record.keys()), set(wire)
    if keys != want:
        extra, missing = sorted(keys - want), sorted(want - keys)
        return None, f"adapter keys differ (missing {missing[:2]}, unexpected {extra[:2]})"
    size = sum(len(record[k].data) for k in record)
    if size > max_bytes:
        return None, f"update of {size} bytes exceeds the bound of {max_bytes}"
    for key, spec in wire.items():
        array = record[key]
        if array.dtype != spec.dtype or tuple(array.shape) != spec.shape:
            got_as = f"{array.dtype}{list(array.shape)}"
            return None, f"{key}: dtype and shape {got_as}, expected {spec.dtype}{list(spec.shape)}"
    try:
        state = _decode(record, expected, wire_dtype)
    except Exception as exc:  # noqa: BLE001 - any undecodable payload is a bad reply
        return None, f"undecodable arrays: {exc}"
    for key, tensor in state.items():
        if tuple(tensor.shape) != expected[key].shape:
            return None, f"{key}: payload shape {list(tensor.shape)} differs from its header"
        if not bool(torch.isfinite(tensor).all()):
            return None, f"{key}: non-finite values"
    return state, None


def client_error(message: Message, limit: int = 300) -> str:
    """The reason of an error reply, short: the last line of a traceback, trimmed."""
    lines = [line.strip() for line in str(message.error.reason).splitlines() if line.strip()]
    last = lines[-1] if lines else "no reason given"
    return "client error: " + (last if len(last) <= limit else last[: limit - 3] + "...")


# --------------------------------------------------------------------------- seed steps

def seeds_to_record(steps: Sequence[tuple[int, float]]) -> ArrayRecord:
    """Seed steps as they travel: 8 bytes a step plus the record's headers."""
    return ArrayRecord(
        {
            "index": Array(np.array([i for i, _ in steps], dtype=np.int32)),
            "scalar": Array(np.array([g for _, g in steps], dtype=np.float32)),
        }
    )


def seeds_from_record(record: ArrayRecord) -> list[tuple[int, float]]:
    indices, scalars = record["index"].numpy(), record["scalar"].numpy()
    return [(int(i), float(g)) for i, g in zip(indices.tolist(), scalars.tolist(), strict=True)]


def check_seed_reply(
    message: Message, num_seeds: int, max_steps: int
) -> tuple[list[tuple[int, float]] | None, str | None]:
    """Validate a seed-only training reply: ``(steps, None)`` or ``(None, reason)``.

    A valid reply has one ``seed-steps`` record with an int32 ``index`` in
    ``[0, num_seeds)`` and a finite fp32 ``scalar`` per step, between 1 and
    ``max_steps`` steps, and a positive example count.
    """
    if message.has_error():
        return None, client_error(message)
    content = message.content
    if set(content.array_records) != {SEEDS_KEY} or set(content.metric_records) != {METRICS_KEY}:
        return None, f"expected one '{SEEDS_KEY}' array record and one '{METRICS_KEY}' record"
    weight = content.metric_records[METRICS_KEY].get(WEIGHT_KEY)
    if not isinstance(weight, int | float) or not weight > 0:
        return None, f"'{WEIGHT_KEY}' missing or not positive: {weight!r}"
    record = content.array_records[SEEDS_KEY]
    if set(record.keys()) != {"index", "scalar"}:
        return None, f"seed steps need 'index' and 'scalar', got {sorted(record.keys())[:3]}"
    index, scalar = record["index"], record["scalar"]
    if index.dtype != "int32" or scalar.dtype != "float32":
        return None, f"seed steps must be int32 and float32, got {index.dtype}, {scalar.dtype}"
    if len(index.shape) != 1 or tuple(index.shape) != tuple(scalar.shape):
        return None, f"seed steps: shapes {list(index.shape)} and {list(scalar.shape)} differ"
    if not 1 <= index.shape[0] <= max_steps:
        return None, f"{index.shape[0]} seed steps, expected 1 to {max_steps}"
    try:
        indices, scalars = index.numpy(), scalar.numpy()
    except Exception as exc:  # noqa: BLE001 - any undecodable payload is a bad reply
        return None, f"undecodable seed steps: {exc}"
    if indices.shape != index.shape or scalars.shape != scalar.shape:
        return None, "seed steps: payload size differs from its header"
    if ((indices < 0) | (indices >= num_seeds)).any():
        return None, f"seed index outside the pool of {num_seeds}"
    if not np.isfinite(scalars).all():
        return None, "seed steps: non-finite scalars"
    return seeds_from_record(record), None
