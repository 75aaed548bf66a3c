"""Local training engines, chosen by name (``client.engine``), and their settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtune.engines.backprop import BackpropEngine
from fedtune.engines.base import (
    BackpropSettings,
    Engine,
    ForwardSettings,
    LocalTraining,
    ProbeSettings,
    Update,
    ZerothSettings,
    default_eps,
    sample_batches,
)
from fedtune.engines.forward import ForwardEngine
from fedtune.engines.zeroth import ZerothEngine
from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.config import Scenario

ENGINES: dict[str, type] = {
    "backprop": BackpropEngine,
    "forward": ForwardEngine,
    "zeroth": ZerothEngine,
}


SETTINGS: dict[str, type[LocalTraining]] = {
    "backprop": BackpropSettings,
    "forward": ForwardSettings,
    "zeroth": ZerothSettings,
}
"""Each engine's settings class."""


def get_engine(name: str) -> Engine:
    """The engine registered under ``name``."""
    if name not in ENGINES:
        raise ConfigError(f"unknown client.engine {name!r}: use one of {', '.join(ENGINES)}")
    engine: Engine = ENGINES[name]()
    return engine


def engine_eps(scenario: Scenario) -> float:
    """``client.eps``, or (0) the perturbation size that works in the compute dtype."""
    return scenario.client.eps or default_eps(scenario.model.compute_dtype)


def engine_settings(
    name: str,
    scenario: Scenario,
    *,
    seed: int,
    proximal_mu: float = 0.0,
    train_only: str = "all",
) -> LocalTraining:
    """The settings object of engine ``name`` for one client-round of ``scenario``.

    The builder keeps engines free of the scenario: each gets plain values, and the
    defaults live in :class:`fedtune.config.ClientConfig` alone.
    """
    client = scenario.client
    common = LocalTraining(
        lr=client.lr,
        local_steps=client.local_steps,
        batch_size=client.batch_size,
        weight_decay=client.weight_decay,
        seed=seed,
        proximal_mu=proximal_mu,
        train_only=train_only,
        recompute_logits=client.recompute_logits,
    )
    values = {f: getattr(common, f) for f in common.__dataclass_fields__}
    if name == "backprop":
        return common
    if name == "zeroth":
        return ZerothSettings(
            **values,
            eps=engine_eps(scenario),
            num_seeds=client.num_seeds,
            run_seed=scenario.run.seed,
        )
    if name == "forward":
        return ForwardSettings(
            **values,
            eps=engine_eps(scenario),
            perturbations=client.perturbations,
            max_perturbations=client.max_perturbations,
            variance_threshold=client.variance_threshold,
            forward_derivative=client.forward_derivative,
            forward_optimizer=client.forward_optimizer,
            num_seeds=client.num_seeds,
            run_seed=scenario.run.seed,
        )
    raise ConfigError(f"unknown client.engine {name!r}: use one of {', '.join(ENGINES)}")


__all__ = [
    "ENGINES",
    "SETTINGS",
    "BackpropSettings",
    "Engine",
    "ForwardSettings",
    "LocalTraining",
    "ProbeSettings",
    "Update",
    "ZerothSettings",
    "default_eps",
    "engine_eps",
    "engine_settings",
    "get_engine",
    "sample_batches",
]
