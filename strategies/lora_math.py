"""Maths shared by the LoRA-aware strategies: pure functions over adapter state dicts.

An adapter is a ``dict[str, torch.Tensor]`` named as PEFT names it
(``...q_proj.lora_A.weight``, ``...q_proj.lora_B.weight``). A LoRA update of a weight
is ``B @ A``; strategies that treat the two factors differently (FFA-LoRA freezes A,
FedSA-LoRA keeps B on the client) select them by name with :func:`lora_part`.

Nothing here does I/O or touches Flower records, except :func:`unpack_replies`, which
turns validated reply contents into (adapter, weight) pairs for the functions below.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from flwr.app import RecordDict

from fedtune.wire import from_record

Adapter = dict[str, torch.Tensor]
PARTS = ("A", "B")


def lora_part(name: str) -> str | None:
    """``"A"`` or ``"B"`` for a LoRA factor's tensor name, ``None`` for anything else."""
    for part in PARTS:
        if f"lora_{part}" in name:
            return part
    return None


def select(state: Mapping[str, torch.Tensor], parts: Iterable[str | None]) -> Adapter:
    """The tensors of ``state`` whose :func:`lora_part` is one of ``parts``.

    ``None`` in ``parts`` selects the tensors that are neither factor (other adapter
    weights, if the adapter has any).
    """
    wanted = set(parts)
    return {k: v for k, v in state.items() if lora_part(k) in wanted}


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> Adapter:
    """The weighted mean of ``states`` (same keys), tensor by tensor, in their dtype.

    Weights are normalised to sum to 1; the sum runs in the order given, as Flower's
    ``aggregate_arrayrecords`` does, so the result is the same bit for bit.
    """
    if not states or len(states) != len(weights):
        raise ValueError(
            f"need one weight per state, got {len(states)} states, {len(weights)} weights"
        )
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    factors = [float(w) / total for w in weights]
    out: Adapter = {}
    for state, factor in zip(states, factors, strict=True):
        for key, value in state.items():
            # A Python float keeps the tensor's dtype (a NumPy float64 scalar would not).
            out[key] = value * factor if key not in out else out[key] + value * factor
    return out


def unpack_replies(
    contents: Sequence[RecordDict], arrayrecord_key: str, weighted_by_key: str
) -> tuple[list[Adapter], list[float]]:
    """Adapters and weights of reply contents (one ArrayRecord and one MetricRecord each)."""
    states: list[Adapter] = []
    weights: list[float] = []
    for content in contents:
        states.append(from_record(content.array_records[arrayrecord_key]))
        metrics = next(iter(content.metric_records.values()))
        weights.append(float(metrics[weighted_by_key]))  # type: ignore[arg-type]
    return states, weights
