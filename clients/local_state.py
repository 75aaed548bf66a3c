"""A LoRA factor that stays on the client between rounds (FedSA-LoRA keeps its B).

A strategy that wants part of the adapter kept locally declares it (its
``keeps_local`` trait), and the loop says so in each client's instructions
(:attr:`fedtune.protocol.TrainInstructions.local`). The node keeps that part in Flower's per-node
``context.state``, a RecordDict that lives across messages for a node — in a Ray
simulation and on a SuperNode alike — and from its next round on puts it in place of
the part the server sent. ``"none"`` (the default) keeps nothing.

What is kept lives as long as Flower's node context: a restarted SuperNode, or a
simulation resumed from a checkpoint, starts again from the part the server sends.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import Context
from flwr.common.logger import log

from fedtune.errors import ConfigError
from fedtune.models.lora import AdapterState
from fedtune.protocol import LOCAL_KEY, LOCAL_PARTS
from fedtune.wire import from_record, to_record

STATE_KEY = "fedsa-local"
"""Key of the kept tensors in ``context.state.array_records``."""


def _kept_keys(state: AdapterState, part: str) -> list[str]:
    if part not in LOCAL_PARTS:
        raise ConfigError(f"{LOCAL_KEY} must be one of {', '.join(LOCAL_PARTS)}, got {part!r}")
    return [] if part == "none" else [k for k in state if f"lora_{part}" in k]


def restore_local(context: Context, state: AdapterState, part: str) -> AdapterState:
    """``state`` with its ``lora_<part>`` tensors replaced by the ones this node kept.

    Unchanged when ``part`` is ``"none"``, when nothing was kept yet (the client's first
    round) or when the kept tensors do not match ``state`` in names and shapes (another
    adapter: the received one is used, and :func:`keep_local` replaces what was kept).
    """
    keys = _kept_keys(state, part)
    if not keys or STATE_KEY not in context.state.array_records:
        return state
    kept = from_record(context.state.array_records[STATE_KEY])
    if sorted(kept) != sorted(keys) or any(kept[k].shape != state[k].shape for k in keys):
        log(WARNING, "The kept lora_%s does not fit the adapter received; using the received", part)
        return state
    return {**state, **kept}


def keep_local(context: Context, state: AdapterState, part: str) -> None:
    """Keep the ``lora_<part>`` tensors of ``state`` (the adapter after training)."""
    keys = _kept_keys(state, part)
    if keys:
        context.state.array_records[STATE_KEY] = to_record({k: state[k] for k in keys})
