"""The protocol every local-training engine follows.

An engine trains the adapter of a PEFT model on a client's chunks and returns an
:class:`Update`. Engines get plain arguments (:class:`EngineConfig`), never the whole
scenario, so they can be used outside a federation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedtune.engines.seeds import SeedStep
from fedtune.errors import ConfigError
from fedtune.models.lora import AdapterState

TRAIN_ONLY = ("all", "A", "B")
"""Values of :attr:`EngineConfig.train_only`."""
DERIVATIVES = ("jvp", "fd")
"""Values of :attr:`EngineConfig.forward_derivative`."""
OPTIMIZERS = ("sgd", "adamw")
"""Values of :attr:`EngineConfig.forward_optimizer`."""


@dataclass(frozen=True)
class EngineConfig:
    """What an engine needs to train one client for one round."""

    lr: float
    local_steps: int
    batch_size: int
    weight_decay: float = 0.0
    seed: int = 0
    """Seeds batch sampling and dropout of this client-round."""
    proximal_mu: float = 0.0
    """FedProx weight ``mu`` of ``mu/2 * ||w - w_global||^2`` on the adapter (0: off)."""
    train_only: str = "all"
    """Which LoRA factor is trained: ``all``, ``A`` or ``B`` (the other stays exactly as
    loaded; FFA-LoRA trains only ``B``)."""
    eps: float = 1e-2
    """Perturbation size of two-point finite differences (``zeroth``; ``forward`` with
    ``forward_derivative = "fd"``). 1e-2 suits fp32 and bf16 compute alike: on
    SmolLM2-135M it is within 3-8% of the exact slope in fp32 (1e-3: 0.1%), while in
    bf16 anything below 1e-2 drowns in rounding (1e-3: off by 86-1400%)."""
    num_seeds: int = 4096
    """K, the size of the ``zeroth`` engine's seed pool (FedKSeed's default)."""
    run_seed: int = 0
    """The run's seed: fixes the seed pool, which the server and all clients share."""
    perturbations: int = 4
    """``forward``: directions drawn per step before the variance check."""
    max_perturbations: int = 16
    """``forward``: at most this many directions per step."""
    variance_threshold: float = 0.05
    """``forward``: draw more directions while the estimated variance of the gradient
    estimate (mean over its values; it needs two directions) exceeds this. 0 always
    draws ``max_perturbations``. With 4 directions SmolLM2-135M's estimate measured
    0.05-0.09 (LoRA r=8 on q, v; 4 x 128 tokens), so early steps draw a few more."""
    forward_derivative: str = "jvp"
    """``forward``: directional derivative by ``jvp`` (exact, forward-mode AD) or ``fd``
    (two-point finite difference with ``eps``, forward passes only)."""
    forward_optimizer: str = "sgd"
    """``forward``: the optimizer that applies the estimated gradient, ``sgd`` or
    ``adamw``."""

    def __post_init__(self) -> None:
        if not self.proximal_mu >= 0:
            raise ConfigError(f"proximal-mu must be >= 0, got {self.proximal_mu!r}")
        if self.train_only not in TRAIN_ONLY:
            raise ConfigError(
                f"lora-train must be one of {', '.join(TRAIN_ONLY)}, got {self.train_only!r}"
            )
        if not self.eps > 0:
            raise ConfigError(f"eps must be positive, got {self.eps!r}")
        if self.num_seeds < 1:
            raise ConfigError(f"num-seeds must be at least 1, got {self.num_seeds!r}")
        if not 1 <= self.perturbations <= self.max_perturbations:
            raise ConfigError(
                "need 1 <= perturbations <= max-perturbations, got "
                f"{self.perturbations!r} and {self.max_perturbations!r}"
            )
        if not self.variance_threshold >= 0:
            raise ConfigError(f"variance-threshold must be >= 0, got {self.variance_threshold!r}")
        if self.forward_derivative not in DERIVATIVES:
            raise ConfigError(
                f"forward-derivative must be one of {', '.join(DERIVATIVES)}, "
                f"got {self.forward_derivative!r}"
            )
        if self.forward_optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"forward-optimizer must be one of {', '.join(OPTIMIZERS)}, "
                f"got {self.forward_optimizer!r}"
            )


def default_eps(compute_dtype: str) -> float:
    """A perturbation size that works in ``compute_dtype`` (``client.eps = 0``).

    fp32: 1e-3, MeZO's choice, within 0.1% of the exact slope on SmolLM2-135M. bf16
    keeps 8 bits of mantissa: the loss difference of a 1e-3 step drowns in rounding
    (measured 86-1400% off), while 1e-2 comes within 3-8%.
    """
    return 1e-3 if compute_dtype == "fp32" else 1e-2


@dataclass
class Update:
    """The result of local training."""

    state: AdapterState
    """The adapter after training (what a strategy aggregates)."""
    num_examples: int
    """Sequences seen (the FedAvg weight)."""
    loss: float
    """Mean training loss over the local steps."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Engine-specific numbers (first and last step loss, ...)."""
    seed_steps: list[SeedStep] | None = None
    """Seed-only engines (``zeroth``): the (seed index, scalar) of each local step, in
    order; :func:`fedtune.engines.seeds.replay` of them on the starting adapter gives
    :attr:`state` bit for bit. None for other engines."""


class Engine(Protocol):
    """``train(model, chunks, config) -> Update``."""

    name: str

    def train(self, model: Any, chunks: torch.Tensor, config: EngineConfig) -> Update: ...


def sample_batches(num_chunks: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Indices of ``steps`` batches: a seeded shuffle, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(num_chunks, generator=generator).tolist())
    return [torch.tensor(order[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]
