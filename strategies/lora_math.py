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


# Heterogeneous ranks. A client of rank r holds A of shape (r, d_in) and B of shape
# (d_out, r) for every LoRA module; the adapter's scale (alpha / r in PEFT) is kept the
# same at every rank (fedtune sets alpha in proportion to r), so ``B @ A`` means the
# same weight update whatever the rank.


def module_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The LoRA modules of ``state``: the key prefixes before ``.lora_A``."""
    return sorted({k.split(".lora_A")[0] for k in state if lora_part(k) == "A"})


def factor_keys(state: Mapping[str, torch.Tensor], module: str) -> tuple[str, str]:
    """The keys of ``module``'s A and B tensors in ``state``."""
    a = next(k for k in state if k.startswith(module + ".lora_A"))
    b = next(k for k in state if k.startswith(module + ".lora_B"))
    return a, b


def rank_of(state: Mapping[str, torch.Tensor]) -> int:
    """The LoRA rank of ``state`` (rows of its A tensors; all modules share it)."""
    ranks = {int(v.shape[0]) for k, v in state.items() if lora_part(k) == "A"}
    if len(ranks) != 1:
        raise ValueError(f"adapter has LoRA A tensors of ranks {sorted(ranks)}, expected one")
    return ranks.pop()


def truncate(state: Mapping[str, torch.Tensor], rank: int) -> Adapter:
    """The first ``rank`` components: rows of every A, columns of every B."""
    out: Adapter = {}
    for key, value in state.items():
        part = lora_part(key)
        if part == "A":
            out[key] = value[:rank].clone()
        elif part == "B":
            out[key] = value[:, :rank].clone()
        else:
            out[key] = value.clone()
    return out


def pad(state: Mapping[str, torch.Tensor], rank: int) -> Adapter:
    """``state`` zero-padded to ``rank`` components (the inverse of :func:`truncate`)."""
    out: Adapter = {}
    for key, value in state.items():
        part = lora_part(key)
        if part == "A":
            out[key] = torch.cat([value, value.new_zeros(rank - value.shape[0], value.shape[1])])
        elif part == "B":
            out[key] = torch.cat(
                [value, value.new_zeros(value.shape[0], rank - value.shape[1])], dim=1
            )
        else:
            out[key] = value.clone()
    return out


def stack(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Adapter:
    """FLoRA's stacking: one adapter whose ``B @ A`` is ``sum_k w_k B_k @ A_k``, exactly.

    For every module, A is the clients' A stacked row-wise and B their weighted B side
    by side; the ranks may differ. The result's rank is the sum of theirs. Tensors that
    are neither factor are averaged with the (normalised) weights.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} and {len(weights)}")
    out: Adapter = {}
    for module in module_names(states[0]):
        a_key, b_key = factor_keys(states[0], module)
        out[a_key] = torch.cat([s[a_key] for s in states], dim=0)
        out[b_key] = torch.cat(
            [s[b_key] * float(w) for s, w in zip(states, weights, strict=True)], dim=1
        )
    others = [select(s, [None]) for s in states]
    if others[0]:
        out.update(weighted_average(others, weights))
    return out


def refactor(state: Mapping[str, torch.Tensor], rank: int) -> tuple[Adapter, float]:
    """The best rank-``rank`` adapter for the product ``B @ A`` of every module.

    Computed without forming ``B @ A``: QR of both factors, then an SVD of the small
    core (float64). The factors come out balanced (``B = U sqrt(S)``, ``A = sqrt(S) V^T``)
    with components in decreasing singular value, so :func:`truncate` keeps the
    strongest ones, and each component's sign fixed. Exact when the input's rank is
    at most ``rank`` (zero-padded then).

    Returns the adapter and the relative Frobenius error of the products it dropped,
    over all modules: ``sqrt(sum of dropped s^2 / sum of s^2)``.
    """
    out: Adapter = dict(select(state, [None]))
    dropped = kept = 0.0
    for module in module_names(state):
        a_key, b_key = factor_keys(state, module)
        a, b = state[a_key].double(), state[b_key].double()
        q_b, r_b = torch.linalg.qr(b)
        q_a, r_a = torch.linalg.qr(a.T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)
        k = min(rank, s.shape[0])
        root = s[:k].sqrt()
        # An SVD is unique only up to the sign of each component: fix it (largest entry
        # of each column of B positive) so the factors do not depend on rounding.
        u_k = q_b @ u[:, :k]
        signs = torch.sign(u_k.gather(0, u_k.abs().argmax(dim=0, keepdim=True)))[0]
        signs[signs == 0] = 1.0
        u, vh = u.clone(), vh.clone()
        u[:, :k] *= signs
        vh[:k] *= signs[:, None]
        new_b = (q_b @ u[:, :k]) * root
        new_a = root[:, None] * (vh[:k] @ q_a.T)
        out[a_key] = torch.zeros(rank, a.shape[1], dtype=state[a_key].dtype)
        out[b_key] = torch.zeros(b.shape[0], rank, dtype=state[b_key].dtype)
        out[a_key][:k] = new_a.to(out[a_key].dtype)
        out[b_key][:, :k] = new_b.to(out[b_key].dtype)
        dropped += float((s[k:] ** 2).sum())
        kept += float((s[:k] ** 2).sum())
    total = dropped + kept
    return out, (dropped / total) ** 0.5 if total > 0 else 0.0


def product_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Frobenius norm of the whole update: ``sqrt(sum over modules of ||B @ A||^2)``."""
    total = 0.0
    for module in module_names(state):
        a_key, b_key = factor_keys(state, module)
        total += float(torch.linalg.matrix_norm(state[b_key].double() @ state[a_key].double()) ** 2)
    return total**0.5
