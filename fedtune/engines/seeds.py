"""Seed-only updates: FedKSeed's seed pool, perturbations rebuilt from a seed, and replay.

FedKSeed (Qin et al., "Federated Full-Parameter Tuning of Billion-Sized Language
Models with Communication Cost under 18 Kilobytes", ICML 2024) runs MeZO-style
zeroth-order steps whose perturbation is drawn from one of K seeds fixed for the run.
A local step is then just ``(seed index, projected-gradient scalar)``: anyone who
holds the starting adapter and the pool can redo it.

A perturbation ``z(seed)`` has one independent ±1 entry per adapter value (Rademacher,
as in Spall's SPSA, rather than MeZO's Gaussian): ``E[z zᵀ] = I`` just the same, with
lower variance, and it is built from integer bits, so any platform regenerates it bit
for bit. The bits are PCG64's raw output (numpy's ``PCG64(seed)``), read little-endian,
one bit per value, over the adapter's ``(name, shape)`` list in sorted-name order.

:func:`apply_step` is the one update rule, ``w <- w - lr * g * z``, used by the zeroth
engine itself and by :func:`replay`. The scalar ``g`` is rounded to fp32 (as it
travels) and ``lr * g`` to fp32 before use; since ``z`` is ±1 the product is exact,
so ``w - c * z`` rounds once, identically with or without fused multiply-add. Replaying
a client's steps on the adapter it started from therefore gives its final adapter bit
for bit: the adapter as sent, since PEFT keeps LoRA weights in fp32 on a bf16 base too.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

import numpy as np
import torch

from fedtune.models.lora import AdapterState

SeedStep = tuple[int, float]
"""One zeroth-order step: (index into the seed pool, projected-gradient scalar)."""
Spec = tuple[str, tuple[int, ...]]
"""An adapter tensor's name and shape."""


def seed_pool(run_seed: int, k: int) -> list[int]:
    """The run's K perturbation seeds (uint32), fixed by ``run_seed`` alone."""
    if k < 1:
        raise ValueError(f"a seed pool needs at least one seed, got k={k}")
    return [int(s) for s in np.random.SeedSequence(run_seed).generate_state(k, dtype=np.uint32)]


def trained_keys(state: AdapterState, train_only: str = "all") -> list[str]:
    """The sorted adapter keys a step changes: all of them (every LoRA factor and a task
    head), or only LoRA ``A`` or ``B``."""
    return sorted(k for k in state if train_only == "all" or f"lora_{train_only}" in k)


def perturbation(seed: int, specs: Sequence[Spec]) -> dict[str, torch.Tensor]:
    """``z(seed)``: a ±1 fp32 tensor per ``(name, shape)``, in the order given."""
    sizes = [math.prod(shape) for _, shape in specs]
    words = np.random.PCG64(seed).random_raw(-(-sum(sizes) // 64))
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")
    signs = torch.from_numpy(bits[: sum(sizes)].astype(np.float32) * 2.0 - 1.0)
    out: dict[str, torch.Tensor] = {}
    start = 0
    for (name, shape), size in zip(specs, sizes, strict=True):
        out[name] = signs[start : start + size].view(shape)
        start += size
    return out


def apply_step(
    state: AdapterState, keys: Sequence[str], seed: int, scalar: float, lr: float
) -> None:
    """``w <- w - lr * scalar * z(seed)`` on ``state[keys]`` (fp32), in place."""
    z = perturbation(seed, [(k, tuple(state[k].shape)) for k in keys])
    step = float(np.float32(lr * scalar))
    for key in keys:
        state[key].sub_(z[key], alpha=step)


def replay(
    state: AdapterState,
    steps: Sequence[SeedStep],
    pool: Sequence[int],
    lr: float,
    train_only: str = "all",
) -> AdapterState:
    """The adapter after ``steps`` from ``state`` (which is left unchanged)."""
    out = {k: v.detach().to(torch.float32).clone() for k, v in state.items()}
    keys = trained_keys(out, train_only)
    for index, scalar in steps:
        apply_step(out, keys, pool[index], scalar, lr)
    return out


def aggregate_steps(
    histories: Sequence[Sequence[SeedStep]], weights: Sequence[float]
) -> list[SeedStep]:
    """FedKSeed's aggregation: the weighted mean of the clients' updates as one step per
    seed index used (scalars of the same seed add up), sorted by index.

    Replaying the result applies ``sum_c w_c/W * sum_j g_cj z_cj``, the weighted mean of
    the clients' updates (exactly so up to fp32 rounding).
    """
    if len(histories) != len(weights) or not histories:
        raise ValueError("need one positive weight per client history")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    sums: dict[int, float] = {}
    for steps, weight in zip(histories, weights, strict=True):
        for index, scalar in steps:
            sums[index] = sums.get(index, 0.0) + scalar * weight / total
    return [(index, float(np.float32(sums[index]))) for index in sorted(sums)]


def seed_probabilities(history: Sequence[Sequence[SeedStep]], k: int) -> np.ndarray | None:
    """FedKSeed-Pro's non-uniform seed sampling: a probability per seed of the pool of
    ``k`` from the history of merged steps (None while it is empty: uniform).

    A seed's importance is the mean amplitude ``|g|`` of its scalars so far (a seed not
    used yet gets the mean over those used); importances are min-max normalized to
    [0, 1] and the probabilities are their softmax, so the most important seed is drawn
    at most ``e`` times as often as the least.
    """
    totals, counts = np.zeros(k), np.zeros(k)
    for steps in history:
        for index, scalar in steps:
            totals[index] += abs(scalar)
            counts[index] += 1
    used = counts > 0
    if not used.any():
        return None
    amplitude = np.where(used, totals / np.maximum(counts, 1), (totals[used] / counts[used]).mean())
    spread = amplitude.max() - amplitude.min()
    normalized = (amplitude - amplitude.min()) / spread if spread > 0 else np.zeros(k)
    weights = np.exp(normalized - normalized.max())
    return weights / weights.sum()


def encode_steps(steps: Sequence[SeedStep]) -> bytes:
    """Steps on the wire: ``n`` little-endian int32 seed indices, then ``n`` fp32 scalars."""
    n = len(steps)
    return struct.pack(f"<{n}i{n}f", *(i for i, _ in steps), *(g for _, g in steps))


def decode_steps(data: bytes) -> list[SeedStep]:
    """Inverse of :func:`encode_steps` (exact: the scalars are fp32 already)."""
    if len(data) % 8:
        raise ValueError(f"encoded seed steps must be 8 bytes each, got {len(data)} bytes")
    n = len(data) // 8
    values = struct.unpack(f"<{n}i{n}f", data)
    return [(int(i), float(g)) for i, g in zip(values[:n], values[n:], strict=True)]


def steps_nbytes(count: int) -> int:
    """Bytes of ``count`` encoded steps (4 for the index, 4 for the scalar)."""
    return 8 * count


def history_is_smaller(count: int, state: AdapterState, bytes_per_value: float = 4.0) -> bool:
    """Whether ``count`` seed steps are fewer bytes than the adapter itself (fp32 by
    default; 2 for fp16), i.e. whether a client behind by that many steps should
    download the history and replay it rather than the adapter."""
    adapter_bytes = bytes_per_value * sum(v.numel() for v in state.values())
    return steps_nbytes(count) < adapter_bytes


def adapter_digest(state: AdapterState) -> str:
    """SHA-256 of an adapter's fp32 values in sorted-key order (names and shapes too).

    A client that rebuilds the global adapter from the history of seed steps checks it
    against the server's digest: a mismatch means its copy is not the server's.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().to(torch.float32).contiguous()
        digest.update(f"{key}:{list(value.shape)};".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


class CatchUpError(ValueError):
    """The kept adapter cannot be brought to the server's by the steps sent."""


def catch_up_adapter(
    kept: tuple[int, AdapterState] | None,
    start: int,
    steps: Sequence[SeedStep],
    pool: Sequence[int],
    lr: float,
    train_only: str,
    digest: str,
) -> AdapterState:
    """FedKSeed's catch-up: the kept ``(version, adapter)`` with the server's ``steps``
    since version ``start`` replayed on it, checked against the server's ``digest``.

    The one implementation for a zeroth ClientApp (its node's copy) and the device
    gateway (the copy it last sent a phone).
    """
    if kept is None:
        raise CatchUpError(f"cannot catch up from adapter version {start}: none kept")
    version, adapter = kept
    if version != start:
        raise CatchUpError(f"cannot catch up from adapter version {start}: holds {version}")
    state = replay(adapter, steps, pool, lr, train_only)
    if adapter_digest(state) != digest:
        raise CatchUpError(f"the adapter replayed from version {start} differs from the server's")
    return state


# -- FwdLLM: forward-gradient probes over the seed pool ---------------------------------


def combine(
    steps: Sequence[SeedStep], pool: Sequence[int], specs: Sequence[Spec]
) -> dict[str, torch.Tensor]:
    """``sum_i g_i z(pool[i])`` over ``steps`` (fp32): e.g. the last global gradient
    estimate from its merged steps, which is what a client rebuilds as its guide."""
    total = {name: torch.zeros(shape) for name, shape in specs}
    for index, scalar in steps:
        z = perturbation(pool[index], specs)
        for name, t in total.items():
            t.add_(z[name], alpha=scalar)
    return total


def pick_directions(
    rng: np.random.Generator,
    count: int,
    pool: Sequence[int],
    specs: Sequence[Spec],
    guide: dict[str, torch.Tensor] | None = None,
    sigmas: float = 0.0,
    tries: int = 32,
) -> tuple[list[int], int]:
    """``count`` pool indices for forward-gradient probes, and the candidates drawn.

    Uniform draws from the pool, unless a ``guide`` and ``sigmas > 0`` ask for FwdLLM's
    discriminative sampling: a candidate ``z`` is kept only when ``|<z, g>| / ||g||``
    — its cosine with the guide ``g`` times ``sqrt(D)``, which for a random ±1 direction
    is a standard normal — is at least ``sigmas``. A direction not found in ``tries``
    candidates is left out (the client probes fewer). The sign of ``<z, g>`` does not
    matter: the estimate ``(grad . z) z`` is the same for ``-z``.
    """
    if guide is None or sigmas <= 0:
        return [int(i) for i in rng.integers(len(pool), size=count)], count
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in guide.values()))
    if not norm > 0:
        return [int(i) for i in rng.integers(len(pool), size=count)], count
    kept: list[int] = []
    drawn = 0
    for _ in range(count):
        for _ in range(tries):
            index = int(rng.integers(len(pool)))
            drawn += 1
            if alignment(perturbation(pool[index], specs), guide, norm) >= sigmas:
                kept.append(index)
                break
    return kept, drawn


def alignment(z: dict[str, torch.Tensor], guide: dict[str, torch.Tensor], norm: float) -> float:
    """``|<z, g>| / ||g||`` (``norm`` is ``||g||``): a ±1 direction's cosine with ``g``
    in units of ``1/sqrt(D)``."""
    dot = sum(float(torch.dot(z[k].reshape(-1), guide[k].reshape(-1).float())) for k in guide)
    return abs(dot) / norm


def pooled_estimate(
    steps: Sequence[SeedStep], pool: Sequence[int], specs: Sequence[Spec]
) -> tuple[dict[str, torch.Tensor], float]:
    """The forward-gradient estimate ``mean_i g_i z_i`` of probes ``(index, slope)``
    and its variance per value: the sample variance of the ``g_i z_i`` over ``n``,
    averaged over the ``D`` values (``inf`` from one probe).

    As ``||g_i z_i||^2 = g_i^2 D`` for ±1 directions, the spread needs only the sum.
    """
    if not steps:
        raise ValueError("a pooled estimate needs at least one probe")
    total = combine(steps, pool, specs)
    n, size = len(steps), sum(math.prod(shape) for _, shape in specs)
    estimate = {name: t / n for name, t in total.items()}
    if n < 2:
        return estimate, math.inf
    squares = sum(g * g for _, g in steps) * size
    spread = squares - sum(float(t.double().pow(2).sum()) for t in total.values()) / n
    return estimate, max(spread, 0.0) / ((n - 1) * n * size)


def merge_probes(steps: Sequence[SeedStep]) -> list[SeedStep]:
    """Probes as one replayable step per pool index: ``sum_i g_i / n`` for each index,
    sorted. :func:`replay` of the result with ``lr`` is one SGD step along the pooled
    estimate (up to fp32 rounding)."""
    sums: dict[int, float] = {}
    for index, scalar in steps:
        sums[index] = sums.get(index, 0.0) + scalar / len(steps)
    return [(index, float(np.float32(sums[index]))) for index in sorted(sums)]
