"""One checkpoint object holding all server state, written atomically with a checksum.

A checkpoint is written after every round (and after the evaluation before round 1):
the global adapter, the strategy's state (server-optimizer moments and the like), the
round, the resolved scenario and its digest, and the run's running totals. Every
random choice in a run derives from ``(run.seed, round, client)``, so the seed in the
scenario is the whole RNG state; nothing else needs saving.

File format: ``FTCKPT1\\n`` + the payload's SHA-256 (hex) + ``\\n`` + the payload, a
``torch.save`` of plain types and tensors, read back with ``weights_only=True``. It is
written to a temp file, fsynced and renamed; the folder is fsynced too. A truncated
or bit-flipped file fails its checksum and the previous checkpoint is used.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import logging
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.config import SECRET_KEYS, SECTIONS, Scenario, scenario_from_dict, section_values
from fedtune.errors import FedtuneError
from fedtune.metrics import atomic_write_bytes

MAGIC = b"FTCKPT1\n"
logger = logging.getLogger("fedtune")


@dataclass
class Checkpoint:
    """All server state after ``round`` (0: before the first round)."""

    round: int
    scenario_name: str
    scenario_toml: str
    scenario_digest: str
    adapter: dict[str, torch.Tensor]
    strategy: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    """Running totals and perplexities (``initial_perplexity``, ``bytes_up``, ...)."""

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {
                "round": self.round,
                "scenario_name": self.scenario_name,
                "scenario_toml": self.scenario_toml,
                "scenario_digest": self.scenario_digest,
                "adapter": self.adapter,
                "strategy": self.strategy,
                "history": self.history,
            },
            buffer,
        )
        payload = buffer.getvalue()
        return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        """Parse a checkpoint; :class:`CorruptCheckpoint` if it fails any check."""
        header = len(MAGIC) + 65
        if len(data) < header or not data.startswith(MAGIC):
            raise CorruptCheckpoint("not a fedtune checkpoint (bad header or truncated)")
        digest, payload = data[len(MAGIC) : header - 1].decode(errors="replace"), data[header:]
        if hashlib.sha256(payload).hexdigest() != digest:
            raise CorruptCheckpoint("checksum mismatch (truncated or corrupted)")
        try:
            obj = torch.load(io.BytesIO(payload), weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable payload is corrupt
            raise CorruptCheckpoint(f"unreadable payload: {exc}") from exc
        _check_payload(obj)  # a valid checksum proves integrity, not that we wrote it
        return cls(**obj)


class CorruptCheckpoint(Exception):
    """A checkpoint file that fails its checks."""


_PAYLOAD_TYPES: dict[str, type | tuple[type, ...]] = {
    "round": int,
    "scenario_name": str,
    "scenario_toml": str,
    "scenario_digest": str,
    "adapter": dict,
    "strategy": dict,
    "history": dict,
}


def _check_payload(obj: Any) -> None:
    """A payload of the right shape: exactly :class:`Checkpoint`'s fields, each of its
    type, the adapter of named tensors. Anything else is another program's file."""
    if not isinstance(obj, dict) or set(obj) != set(_PAYLOAD_TYPES):
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise CorruptCheckpoint(f"not a fedtune checkpoint payload (holds {keys})")
    for key, kind in _PAYLOAD_TYPES.items():
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise CorruptCheckpoint(f"payload field {key!r} is {type(obj[key]).__name__}")
    if obj["round"] < 0:
        raise CorruptCheckpoint(f"payload round {obj['round']} is negative")
    if not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj["adapter"].items()
    ):
        raise CorruptCheckpoint("payload adapter is not a mapping of names to tensors")


def checkpoint_path(folder: Path, rnd: int) -> Path:
    return Path(folder) / f"round-{rnd:05d}.ckpt"


def save_checkpoint(folder: Path, checkpoint: Checkpoint, keep: int) -> Path:
    """Write ``checkpoint`` atomically, then delete all but the newest ``keep``."""
    folder = Path(folder)
    path = checkpoint_path(folder, checkpoint.round)
    atomic_write_bytes(path, checkpoint.to_bytes())
    _fsync_dir(folder)
    for old in sorted(folder.glob("round-*.ckpt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(folder: Path, problems: list[str] | None = None) -> Checkpoint | None:
    """The newest checkpoint that passes its checks; corrupt ones are logged and skipped
    (and, given ``problems``, each is added to it as ``name: reason``)."""
    for path in sorted(Path(folder).glob("round-*.ckpt"), reverse=True):
        try:
            if not path.is_file():
                raise CorruptCheckpoint("not a regular file")
            return Checkpoint.from_bytes(path.read_bytes())
        except (CorruptCheckpoint, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            logger.warning("checkpoint %s is corrupt (%s); trying the previous one", path, reason)
            if problems is not None:
                problems.append(f"{path.name}: {reason}")
    return None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- resume


def resume_point(
    run_dir: Path,
    requested: Scenario | None,
    allow_config_change: bool = False,
    locked: bool = False,
) -> tuple[Scenario, Checkpoint]:
    """The scenario and checkpoint to resume ``run_dir`` from.

    ``requested`` (a scenario given on the command line) must equal the checkpoint's,
    or the differing keys are named and resuming is refused, unless
    ``allow_config_change``.
    """
    from fedtune.rundir import check_run_dir

    run_dir = Path(run_dir)
    if not locked:  # the caller does not hold the lock: refuse a folder another holds
        check_run_dir(run_dir)
    elif not run_dir.is_dir():
        raise FedtuneError(f"{run_dir} is not a run folder to resume")
    if (run_dir / "summary.json").exists():
        raise FedtuneError(f"{run_dir} holds a finished run (summary.json): nothing to resume")
    problems: list[str] = []
    checkpoint = load_latest_checkpoint(run_dir / "checkpoints", problems)
    if checkpoint is None:
        skipped = f" (skipped {'; '.join(problems)})" if problems else ""
        raise FedtuneError(
            f"{run_dir} has no valid checkpoint to resume from{skipped}: start a new run"
        )
    where = f"{run_dir / 'checkpoints' / checkpoint_path(Path(), checkpoint.round)}"
    missing = [k for k in _HISTORY_KEYS if not isinstance(checkpoint.history.get(k), int | float)]
    if missing:
        raise FedtuneError(f"{where}: not a fedtune run's checkpoint (no {', '.join(missing)})")
    try:
        raw = tomllib.loads(checkpoint.scenario_toml)
    except (ValueError, RecursionError) as exc:
        raise FedtuneError(f"{where}: its scenario is not valid TOML ({exc})") from None
    saved = scenario_from_dict(raw, source=where, name=checkpoint.scenario_name)
    if requested is None:
        return saved, checkpoint
    differing = config_differences(saved, requested)
    fixed = [k for k in differing if k in ADAPTER_SHAPE_KEYS]
    if fixed:
        raise FedtuneError(
            f"the scenario changes {', '.join(fixed)}, which shape the checkpoint's adapter: "
            "no resume can continue it (even with --allow-config-change); start a new run"
        )
    if differing and not allow_config_change:
        raise FedtuneError(
            f"the scenario differs from the checkpoint's in {', '.join(differing)}: resume "
            "without a scenario, or pass --allow-config-change"
        )
    return replace(requested, name=saved.name), checkpoint


_HISTORY_KEYS = ("initial_perplexity", "current_perplexity", "rounds_completed")
"""What :meth:`fedtune.server.loop.RunState.from_checkpoint` reads without a default."""
ADAPTER_SHAPE_KEYS = ("model.name", "model.num_layers", "lora.r", "lora.targets")
"""Keys that decide the adapter's tensor names and shapes: a checkpoint's adapter does
not fit a model built with other values, so no resume may change them."""


def config_differences(a: Scenario, b: Scenario) -> list[str]:
    """Dotted keys whose values differ between two scenarios (secrets aside: the saved
    scenario holds them redacted, and a resume supplies them again)."""
    keys = []
    for section in SECTIONS:
        va, vb = section_values(a, section), section_values(b, section)
        keys += [
            f"{section}.{k}"
            for k in sorted(set(va) | set(vb))
            if va.get(k) != vb.get(k) and (section, k) not in SECRET_KEYS
        ]
    return keys


# ------------------------------------------------------------------ strategy state

_STATE_TYPES = (np.ndarray, torch.Tensor)
_SCALARS = (bool, int, float, str, type(None))


def _is_plain(value: Any) -> bool:
    """A value ``torch.load(weights_only=True)`` reads back as it was written."""
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _constructor_parameters(strategy: Any) -> set[str]:
    """Keyword names of every ``__init__`` in the strategy's class hierarchy: attributes
    of these names are configuration (rebuilt from the scenario), not state."""
    names: set[str] = set()
    for cls in type(strategy).__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        try:
            names.update(inspect.signature(init).parameters)
        except (TypeError, ValueError):
            continue
    return names


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's mutable state, as plain types and tensors.

    A strategy that declares ``state_dict()``/``load_state_dict()``
    (:class:`fedtune.protocol.StatefulStrategy`) gives its own. Otherwise every
    instance attribute that is not a constructor parameter is taken: arrays — which
    covers Flower's server optimizers (FedAdam, FedYogi, FedAdagrad keep
    ``current_arrays``, ``m_t``, ``v_t``; FedAvgM ``momentum_vector``) — and plain values
    (counters, flags, lists of numbers). An attribute of any other type is named in a
    warning: it would not survive a resume.
    """
    from fedtune.protocol import StatefulStrategy

    if isinstance(strategy, StatefulStrategy):
        return {"custom": strategy.state_dict()}
    from flwr.app import ArrayRecord

    config = _constructor_parameters(strategy)
    state: dict[str, Any] = {}
    for name, value in vars(strategy).items():
        if isinstance(value, ArrayRecord):
            state[name] = (
                "arrayrecord",
                {k: torch.from_numpy(v.numpy()) for k, v in value.items()},
            )
        elif (
            isinstance(value, dict)
            and value
            and all(isinstance(v, _STATE_TYPES) for v in value.values())
        ):
            state[name] = ("dict", {k: torch.as_tensor(v) for k, v in value.items()})
        elif isinstance(value, list) and value and all(isinstance(v, _STATE_TYPES) for v in value):
            state[name] = ("list", [torch.as_tensor(v) for v in value])
        elif isinstance(value, _STATE_TYPES):
            state[name] = ("array", torch.as_tensor(value))
        elif name in config or callable(value):
            continue
        elif _is_plain(value):
            state[name] = ("plain", value)
        else:
            logger.warning(
                "strategy %s: attribute %r (%s) is not checkpointed and will not survive a "
                "resume; give the strategy state_dict() and load_state_dict()",
                type(strategy).__name__,
                name,
                type(value).__name__,
            )
    return state


def restore_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    """Put back what :func:`strategy_state` took."""
    if "custom" in state:
        strategy.load_state_dict(state["custom"])
        return
    from flwr.app import Array, ArrayRecord

    for name, (kind, value) in state.items():
        if kind == "arrayrecord":
            setattr(strategy, name, ArrayRecord({k: Array(v.numpy()) for k, v in value.items()}))
        elif kind == "dict":
            setattr(strategy, name, {k: v.numpy() for k, v in value.items()})
        elif kind == "list":
            setattr(strategy, name, [v.numpy() for v in value])
        elif kind == "plain":
            setattr(strategy, name, value)
        else:
            setattr(strategy, name, value.numpy())
