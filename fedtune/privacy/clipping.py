"""Clipping and Gaussian noise on adapter updates: the mechanisms of DP-FedAvg.

H. Brendan McMahan, Daniel Ramage, Kunal Talwar and Li Zhang, "Learning Differentially
Private Recurrent Language Models", ICLR 2018 (arXiv:1710.06963): each client's update
(adapter trained minus adapter received) is clipped to L2 norm ``C``; the server adds
``N(0, (sigma C)^2)`` to the sum and divides by the expected number of clients, a fixed
denominator, so a client that drops out changes nothing the analysis relies on.

Galen Andrew, Om Thakkar, H. Brendan McMahan and Swaroop Ramaswamy, "Differentially
Private Learning with Adaptive Clipping", NeurIPS 2021 (arXiv:1905.03871): ``C`` tracks
a target quantile of the update norms, ``C <- C exp(-lr (b - target))`` where ``b`` is
the noisy fraction of updates that were *not* clipped.

Pure functions over ``dict[str, torch.Tensor]``, no I/O. Noise comes from
:class:`SecureNoise`, a cryptographically secure stream keyed by the operating system,
never from ``run.seed``: noise anyone could regenerate from the published scenario — or
predict from a Mersenne Twister's outputs — could be subtracted again.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedtune.engines.seeds import SeedStep

Update = dict[str, torch.Tensor]

CLIP_MARGIN = 1e-6
"""Clipped updates are scaled to ``C / (1 + margin)`` so fp32 rounding cannot take their
norm past ``C``."""


def difference(
    after: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor], keys: Iterable[str]
) -> Update:
    """``after - before`` on ``keys``, in fp32: a client's update."""
    return {k: after[k].to(torch.float32) - before[k].to(torch.float32) for k in keys}


def l2_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors of ``update`` taken as one vector (in fp64)."""
    return math.sqrt(sum(float(v.to(torch.float64).pow(2).sum()) for v in update.values()))


def clip(update: Mapping[str, torch.Tensor], bound: float) -> tuple[Update, bool]:
    """``update`` scaled to L2 norm at most ``bound``, and whether it was within it already."""
    norm = l2_norm(update)
    if norm <= bound:
        return dict(update), True
    factor = bound / (norm * (1.0 + CLIP_MARGIN))
    return {k: (v.to(torch.float64) * factor).to(v.dtype) for k, v in update.items()}, False


class SecureNoise:
    """Standard normal samples from a cryptographically secure pseudo-random stream.

    The stream is ChaCha20's keystream (the ``cryptography`` package, OpenSSL) under a
    256-bit key from ``os.urandom``: unlike torch's or NumPy's Mersenne Twister, its
    outputs reveal nothing about later ones (Opacus' secure mode makes the same choice
    with torchcsprng). Uniforms of 53 bits become normals by the Box-Muller transform,
    in float64. Floating-point noise remains open to the attacks on its low-order bits
    that Mironov (CCS 2012) describes for the Laplace mechanism; fedtune does not defend
    against them.

    ``seed`` derives the key from a number: for tests only, never for a real run.
    """

    def __init__(self, seed: int | None = None) -> None:
        key = os.urandom(32) if seed is None else hashlib.sha256(b"fedtune-dp-%d" % seed).digest()
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def uniform(self, count: int) -> np.ndarray:
        """``count`` floats, uniform in (0, 1)."""
        words = np.frombuffer(self._stream.update(bytes(8 * count)), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def normal(self, shape: Sequence[int] | torch.Size) -> torch.Tensor:
        """Independent ``N(0, 1)`` samples of ``shape`` (float64)."""
        count = math.prod(shape)
        half = (count + 1) // 2
        u1, u2 = self.uniform(half), self.uniform(half)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * math.pi * u2
        values = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
        return torch.from_numpy(values).reshape(tuple(shape))


def add_noise(update: Mapping[str, torch.Tensor], std: float, noise: SecureNoise) -> Update:
    """``update`` plus independent ``N(0, std^2)`` on every value."""
    return {k: v + (std * noise.normal(v.shape)).to(v.dtype) for k, v in update.items()}


def add(updates: Sequence[Mapping[str, torch.Tensor]]) -> Update:
    """The sum of ``updates`` (same keys), in the order given."""
    total = {k: v.clone() for k, v in updates[0].items()}
    for update in updates[1:]:
        for k, v in update.items():
            total[k] += v
    return total


def secret_generator() -> SecureNoise:
    """A noise source keyed from the operating system's randomness."""
    return SecureNoise()


def next_clip(bound: float, unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """Andrew et al.'s geometric update of the clipping bound.

    More updates under the bound than the target quantile asks for: the bound shrinks;
    fewer: it grows.
    """
    return bound * math.exp(-lr * (unclipped_fraction - target_quantile))


def privatize_seed_steps(
    steps: Sequence[SeedStep], bound: float, noise_multiplier: float, generator: SecureNoise
) -> list[SeedStep]:
    """Local DP for a seed-only (zeroth-order) update: clip and noise its scalars.

    A seed-only update is a list of ``(seed index, projected-gradient scalar)``; the seed
    indices come from the client's seed, not from its data, so the scalars are all the
    data can move. The vector of scalars is clipped to L2 norm ``bound`` and each scalar
    gets ``N(0, (noise_multiplier bound)^2)``; :func:`fedtune.engines.seeds.replay` of the
    result (fp32 scalars, as they travel) gives the adapter that is released (DPZero:
    Liang Zhang et al., "DPZero: Private Fine-Tuning of Language Models without
    Backpropagation", ICML 2024).
    """
    scalars = {"g": torch.tensor([g for _, g in steps], dtype=torch.float32)}
    clipped, _ = clip(scalars, bound)
    noisy = add_noise(clipped, noise_multiplier * bound, generator)["g"]
    return [(index, float(g)) for (index, _), g in zip(steps, noisy.tolist(), strict=True)]
