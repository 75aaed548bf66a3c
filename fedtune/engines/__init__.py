"""Local training engines, chosen by name (``client.engine``)."""

from __future__ import annotations

from fedtune.engines.backprop import BackpropEngine
from fedtune.engines.base import Engine, EngineConfig, Update, default_eps, sample_batches
from fedtune.engines.forward import ForwardEngine
from fedtune.engines.zeroth import ZerothEngine
from fedtune.errors import ConfigError

ENGINES: dict[str, type] = {
    "backprop": BackpropEngine,
    "forward": ForwardEngine,
    "zeroth": ZerothEngine,
}


def get_engine(name: str) -> Engine:
    """The engine registered under ``name``."""
    if name not in ENGINES:
        raise ConfigError(f"unknown client.engine {name!r}: use one of {', '.join(ENGINES)}")
    engine: Engine = ENGINES[name]()
    return engine


__all__ = [
    "ENGINES",
    "Engine",
    "EngineConfig",
    "Update",
    "default_eps",
    "get_engine",
    "sample_batches",
]
