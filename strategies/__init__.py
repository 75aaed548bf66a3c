"""Aggregation strategies, by name (``[strategy] name = ...``).

Built-ins and third-party strategies register in the ``fedtune.strategies``
entry-point group; see :mod:`fedtune.strategies.registry`.
"""

from fedtune.strategies.registry import build_strategy, registered

__all__ = ["build_strategy", "registered"]
