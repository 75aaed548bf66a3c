"""FedKSeed's catch-up: a zeroth-order client rebuilds the global adapter from seed steps.

When every client trains zeroth-order and the strategy aggregates seed steps
(``fedkseed``), each new global adapter is the previous one plus a list of
``(seed index, scalar)`` steps. A client that kept the global adapter of version ``v``
(``context.state``, which lives across messages in a simulation and on a SuperNode)
then needs only the steps of versions ``v+1 .. V`` — 8 bytes each, a few hundred bytes
a round — instead of the whole adapter. The server sends them in place of the adapter
when that is smaller, with the digest of the adapter they must produce; a client whose
copy is missing or different fails the round with a reason, and the server sends the
full adapter next time.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context

from fedtune.engines import ForwardSettings, LocalTraining, ZerothSettings
from fedtune.engines.seeds import CatchUpError, catch_up_adapter, seed_pool
from fedtune.errors import DataError
from fedtune.models.lora import AdapterState
from fedtune.protocol import TrainInstructions
from fedtune.wire import from_record, seeds_from_record, to_record

STATE_KEY = "fedkseed-global"
"""Key of the kept global adapter in ``context.state`` (an array record)."""
VERSION_STATE_KEY = "fedkseed-version"
"""Key of its version (a config record: one RecordDict holds both, so keys differ)."""


def catch_up(
    context: Context, asked: TrainInstructions, steps: ArrayRecord, settings: LocalTraining
) -> AdapterState:
    """The current global adapter: the kept one with ``steps`` replayed on it, checked
    against the server's digest."""
    if asked.catch_up_from is None or not isinstance(settings, ZerothSettings | ForwardSettings):
        raise DataError("seed steps in place of the adapter, but no seed-step catch-up was asked")
    kept = None
    if STATE_KEY in context.state.array_records:
        version = context.state.config_records[VERSION_STATE_KEY]["version"]
        assert isinstance(version, int)
        kept = (version, from_record(context.state.array_records[STATE_KEY]))
    try:
        return catch_up_adapter(
            kept,
            asked.catch_up_from,
            seeds_from_record(steps),
            seed_pool(settings.run_seed, settings.num_seeds),
            settings.lr,
            settings.train_only,
            asked.adapter_digest,
        )
    except CatchUpError as exc:
        raise DataError(f"{exc} on this node") from None


def keep_global(context: Context, asked: TrainInstructions, state: AdapterState) -> None:
    """Keep the global adapter received (when the server versions it) for a later catch-up."""
    if asked.adapter_version is None:
        return
    context.state.array_records[STATE_KEY] = to_record(state)
    context.state.config_records[VERSION_STATE_KEY] = ConfigRecord(
        {"version": asked.adapter_version}
    )
