"""Adapters on the wire: Flower records, their measured size, and update validation.

The server checks every reply against the adapter it sent *before* a strategy sees it
(Flower's FedAvg ends the whole run when one reply's keys differ): a bad phone's reply
is dropped with a reason, and the round goes on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from fedtune.models.lora import AdapterState

ARRAYS_KEY = "arrays"
"""Record key of the adapter (the key Flower's strategies use)."""
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
WEIGHT_KEY = "num-examples"
"""Metric Flower's FedAvg weights by."""


def to_record(state: AdapterState) -> ArrayRecord:
    """An adapter state dict as an :class:`ArrayRecord` (fp32, sorted keys)."""
    return ArrayRecord(
        {k: state[k].detach().to("cpu", torch.float32).contiguous() for k in sorted(state)}
    )


def from_record(record: ArrayRecord) -> AdapterState:
    """An :class:`ArrayRecord` back to a state dict of CPU tensors."""
    return {k: torch.from_numpy(np.array(record[k].numpy(), copy=True)) for k in record}


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
    message: Message, expected: Mapping[str, ArraySpec], max_bytes: int
) -> tuple[AdapterState | None, str | None]:
    """Validate one training reply.

    Returns ``(state, None)`` for a valid update, or ``(None, reason)``: an error reply,
    a missing or extra record, a key, shape or dtype that differs from what was sent, a
    non-finite value, a missing or non-positive example count, or more than
    ``max_bytes`` of arrays.
    """
    if message.has_error():
        return None, f"client error: {message.error.reason}"
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
    keys, want = set(record.keys()), set(expected)
    if keys != want:
        extra, missing = sorted(keys - want), sorted(want - keys)
        return None, f"adapter keys differ (missing {missing[:2]}, unexpected {extra[:2]})"
    size = sum(len(record[k].data) for k in record)
    if size > max_bytes:
        return None, f"update of {size} bytes exceeds the bound of {max_bytes}"
    for key, spec in expected.items():
        array = record[key]
        if array.dtype != spec.dtype or tuple(array.shape) != spec.shape:
            got, want = f"{array.dtype}{list(array.shape)}", f"{spec.dtype}{list(spec.shape)}"
            return None, f"{key}: got {got}, expected {want}"
    try:
        state = from_record(record)
    except Exception as exc:  # noqa: BLE001 - any undecodable payload is a bad reply
        return None, f"undecodable arrays: {exc}"
    for key, tensor in state.items():
        if tuple(tensor.shape) != expected[key].shape:
            return None, f"{key}: payload shape {list(tensor.shape)} differs from its header"
        if not bool(torch.isfinite(tensor).all()):
            return None, f"{key}: non-finite values"
    return state, None


def metric(message: Message, key: str, default: Any = None) -> Any:
    """A metric of a reply, or ``default`` when the reply carries no such metric."""
    if message.has_error() or METRICS_KEY not in message.content.metric_records:
        return default
    return message.content.metric_records[METRICS_KEY].get(key, default)
