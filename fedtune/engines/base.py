"""The protocol every local-training engine follows.

An engine trains the adapter of a PEFT model on a client's chunks and returns an
:class:`Update`. Engines get plain arguments (:class:`EngineConfig`), never the whole
scenario, so they can be used outside a federation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedtune.errors import ConfigError
from fedtune.models.lora import AdapterState

TRAIN_ONLY = ("all", "A", "B")
"""Values of :attr:`EngineConfig.train_only`."""


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

    def __post_init__(self) -> None:
        if not self.proximal_mu >= 0:
            raise ConfigError(f"proximal-mu must be >= 0, got {self.proximal_mu!r}")
        if self.train_only not in TRAIN_ONLY:
            raise ConfigError(
                f"lora-train must be one of {', '.join(TRAIN_ONLY)}, got {self.train_only!r}"
            )


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
