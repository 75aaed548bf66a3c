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

from fedtune.engines import EngineConfig
from fedtune.engines.seeds import adapter_digest, replay, seed_pool
from fedtune.errors import DataError
from fedtune.models.lora import AdapterState
from fedtune.wire import (
    CATCH_UP_KEY,
    DIGEST_KEY,
    VERSION_KEY,
    from_record,
    seeds_from_record,
    to_record,
)

STATE_KEY = "fedkseed-global"
"""Key of the kept global adapter in ``context.state`` (an array record)."""
VERSION_STATE_KEY = "fedkseed-version"
"""Key of its version (a config record: one RecordDict holds both, so keys differ)."""


def catch_up(
    context: Context, config: ConfigRecord, steps: ArrayRecord, settings: EngineConfig
) -> AdapterState:
    """The current global adapter: the kept one with ``steps`` replayed on it, checked
    against the server's digest."""
    start = int(config[CATCH_UP_KEY])
    if STATE_KEY not in context.state.array_records:
        raise DataError(f"cannot catch up from adapter version {start}: none kept on this node")
    held = int(context.state.config_records[VERSION_STATE_KEY]["version"])
    if held != start:
        raise DataError(f"cannot catch up from adapter version {start}: this node holds {held}")
    kept = from_record(context.state.array_records[STATE_KEY])
    pool = seed_pool(settings.run_seed, settings.num_seeds)
    state = replay(kept, seeds_from_record(steps), pool, settings.lr, settings.train_only)
    if adapter_digest(state) != config[DIGEST_KEY]:
        raise DataError(f"the adapter replayed from version {start} differs from the server's")
    return state


def keep_global(context: Context, config: ConfigRecord, state: AdapterState) -> None:
    """Keep the global adapter received (when the server versions it) for a later catch-up."""
    if VERSION_KEY not in config:
        return
    context.state.array_records[STATE_KEY] = to_record(state)
    context.state.config_records[VERSION_STATE_KEY] = ConfigRecord(
        {"version": int(config[VERSION_KEY])}
    )
