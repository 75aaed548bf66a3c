"""The protocol every local-training engine follows.

An engine trains the adapter of a PEFT model on a client's chunks and returns an
:class:`Update`. Engines get plain arguments — their own settings object
(:class:`LocalTraining` for ``backprop``, :class:`ZerothSettings`,
:class:`ForwardSettings`) — never the whole scenario, so they can be used outside a
federation; :func:`fedtune.engines.engine_settings` builds them from a scenario.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedtune.data.instruct import Tokens
from fedtune.engines.seeds import SeedStep
from fedtune.errors import ConfigError
from fedtune.models.lora import AdapterState
from fedtune.protocol import LOSS_FIRST_KEY, LOSS_LAST_KEY, TRAIN_ONLY

DERIVATIVES = ("jvp", "fd")
"""Values of :attr:`ForwardSettings.forward_derivative`."""
OPTIMIZERS = ("sgd", "adamw")
"""Values of :attr:`ForwardSettings.forward_optimizer`."""


@dataclass(frozen=True, kw_only=True)
class LocalTraining:
    """What every engine needs to train one client for one round: the settings of the
    ``backprop`` engine, and the base of the others'."""

    lr: float
    local_steps: int
    batch_size: int
    weight_decay: float = 0.0
    seed: int = 0
    """Seeds batch sampling, dropout and perturbations of this client-round."""
    proximal_mu: float = 0.0
    """FedProx weight ``mu`` of ``mu/2 * ||w - w_global||^2`` on the adapter (0: off)."""
    train_only: str = "all"
    """Which LoRA factor is trained: ``all``, ``A`` or ``B`` (the other stays exactly as
    loaded; FFA-LoRA trains only ``B``)."""
    recompute_logits: bool = False
    """Recompute the loss slices' logits in the backward (less memory, more time)."""

    def __post_init__(self) -> None:
        if not self.proximal_mu >= 0:
            raise ConfigError(f"proximal-mu must be >= 0, got {self.proximal_mu!r}")
        if self.train_only not in TRAIN_ONLY:
            raise ConfigError(
                f"lora-train must be one of {', '.join(TRAIN_ONLY)}, got {self.train_only!r}"
            )


BackpropSettings = LocalTraining
"""The ``backprop`` engine needs nothing more."""


@dataclass(frozen=True, kw_only=True)
class ZerothSettings(LocalTraining):
    """``zeroth``: MeZO steps over FedKSeed's seed pool."""

    eps: float
    """Perturbation size of the two-point differences (:func:`default_eps`)."""
    num_seeds: int
    """K, the size of the seed pool."""
    run_seed: int
    """The run's seed: fixes the seed pool, which the server and all clients share."""
    seed_probabilities: tuple[float, ...] = ()
    """FedKSeed-Pro: the probability of drawing each seed of the pool (empty: uniform)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eps > 0:
            raise ConfigError(f"eps must be positive, got {self.eps!r}")
        if self.num_seeds < 1:
            raise ConfigError(f"num-seeds must be at least 1, got {self.num_seeds!r}")
        if self.seed_probabilities and len(self.seed_probabilities) != self.num_seeds:
            raise ConfigError(
                f"{len(self.seed_probabilities)} seed probabilities for a pool of {self.num_seeds}"
            )


@dataclass(frozen=True, kw_only=True)
class ForwardSettings(LocalTraining):
    """``forward``: forward gradients, a few directions per step (FwdLLM)."""

    eps: float
    """Perturbation size of finite differences (``forward_derivative = "fd"``)."""
    perturbations: int
    """Directions drawn per step before the variance check."""
    max_perturbations: int
    """At most this many directions per step."""
    variance_threshold: float
    """Draw more directions while the estimated variance of the gradient estimate (mean
    over its values; it needs two directions) exceeds this; 0 always draws
    ``max_perturbations``."""
    forward_derivative: str
    """Directional derivative by ``jvp`` (exact, forward-mode AD) or ``fd`` (two-point
    finite difference with ``eps``, forward passes only)."""
    forward_optimizer: str
    """The optimizer that applies the estimated gradient, ``sgd`` or ``adamw``."""
    num_seeds: int = 4096
    """K, the seed pool FwdLLM's probes draw their directions from."""
    run_seed: int = 0
    """The run's seed: fixes the seed pool."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eps > 0:
            raise ConfigError(f"eps must be positive, got {self.eps!r}")
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


@dataclass(frozen=True, kw_only=True)
class ProbeSettings(ForwardSettings):
    """FwdLLM's client work: forward-gradient probes at the adapter received, no step."""

    probes: int
    """Directions to evaluate (one batch each)."""
    guide: tuple[SeedStep, ...] = ()
    """The last global gradient estimate as merged seed steps (discriminative sampling)."""
    guide_sigmas: float = 0.0
    """Keep a direction only when its cosine with the guide is at least this many times
    a random direction's (0: uniform directions)."""
    guide_tries: int = 32
    """Candidates drawn per kept direction."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.probes < 1:
            raise ConfigError(f"probes must be at least 1, got {self.probes!r}")


def default_eps(compute_dtype: str) -> float:
    """A perturbation size that works in ``compute_dtype`` (``client.eps = 0``).

    fp32: 1e-3, MeZO's choice, within 0.1% of the exact slope on SmolLM2-135M. bf16
    keeps 8 bits of mantissa: the loss difference of a 1e-3 step drowns in rounding
    (measured 86-1400% off), while 1e-2 comes within 3-8%. ``"device"``: phones' ONNX
    graphs, whose int8 weights (and dynamic activation quantization) make the loss
    non-smooth at small steps: 1e-2.
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

    def train(self, model: Any, chunks: Tokens, config: Any) -> Update:
        """Train on ``chunks`` with this engine's settings (a :class:`LocalTraining`)."""
        ...


def first_and_last(losses: list[float]) -> dict[str, float]:
    """The metrics every engine reports: its first and last step's loss."""
    return {LOSS_FIRST_KEY: losses[0], LOSS_LAST_KEY: losses[-1]}


def sample_batches(num_chunks: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Indices of ``steps`` batches: a seeded shuffle, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(num_chunks, generator=generator).tolist())
    return [torch.tensor(order[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]
