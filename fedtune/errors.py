"""Errors a user can act on.

Every error raised for bad input derives from :class:`FedtuneError`; the CLI prints
its message as one line and exits non-zero. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class FedtuneError(Exception):
    """An error caused by input the user can fix; the message says how."""


class ConfigError(FedtuneError):
    """A scenario file or override is wrong (unknown key, wrong type, bad value)."""


class ModelError(FedtuneError):
    """A model cannot be found or loaded."""


class DataError(FedtuneError):
    """A data set cannot be found, parsed or partitioned."""


class StrategyError(FedtuneError):
    """A strategy name is unknown or its parameters do not fit it."""


class RunInterrupted(FedtuneError):
    """The run was asked to stop (Ctrl-C); its last checkpoint is kept for ``--resume``."""
