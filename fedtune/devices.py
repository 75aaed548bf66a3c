"""Device tiers and the simulated clock.

A tier describes a class of device (a flagship phone, a Raspberry-Pi-class board,
...): how much slower than this host it trains, its memory, its links, how often it is
available in a round and how often it drops out mid-round. Every client gets a tier
from a seeded mix; every client update then reports *simulated seconds* =
download + compute (measured host seconds × the tier's slowdown) + upload.

The round policy on simulated time (:func:`round_policy`) keeps, of the reports that
arrive within the deadline, the first ``keep`` by simulated arrival, as a real fleet
would; the rest is stragglers' or surplus work, discarded. Everything here is pure and
seeded per (seed, round, client), so it is exact in tests and identical across runs.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from fedtune.errors import ConfigError

TIER_SEED = 0x7E15
"""Fixed seed of the tier mix: runs with different seeds keep the same fleet."""


@dataclass(frozen=True)
class Tier:
    """One class of device."""

    name: str
    slowdown: float
    """Simulated compute seconds per measured host second."""
    memory_mb: float
    """Memory an app may use on the device."""
    uplink_mbps: float
    downlink_mbps: float
    availability: float
    """Probability of being available (idle, charging, on Wi-Fi) in a round."""
    dropout: float
    """Probability of vanishing mid-round once selected."""
    lora_rank: int = 0
    """A LoRA rank for this tier (0: the scenario's)."""
    source: str = ""
    """Where the figures come from."""


_FIELDS = {
    "slowdown",
    "memory_mb",
    "uplink_mbps",
    "downlink_mbps",
    "availability",
    "dropout",
    "lora_rank",
    "source",
}


def load_tiers(name_or_path: str) -> dict[str, Tier]:
    """Tiers from a TOML file (``[tiers.<name>]`` tables), shipped name or path."""
    path = Path(name_or_path)
    if not path.exists():
        shipped = resources.files("fedtune.simulations") / f"{name_or_path}.toml"
        if not shipped.is_file():
            raise ConfigError(
                f"device profiles {name_or_path!r} not found (a .toml path or "
                "a shipped name such as 'devices')"
            )
        path = Path(str(shipped))
    raw = tomllib.loads(path.read_text()).get("tiers")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: no [tiers.<name>] tables")
    tiers = {}
    for name, body in raw.items():
        unknown = set(body) - _FIELDS
        if unknown:
            raise ConfigError(f"{path}: unknown key 'tiers.{name}.{sorted(unknown)[0]}'")
        try:
            tier = Tier(name=name, **body)
        except TypeError as exc:
            raise ConfigError(f"{path}: tiers.{name}: {exc}") from None
        for key in ("slowdown", "memory_mb", "uplink_mbps", "downlink_mbps"):
            if not getattr(tier, key) > 0:
                raise ConfigError(f"{path}: 'tiers.{name}.{key}' must be positive")
        for key in ("availability", "dropout"):
            if not 0 <= getattr(tier, key) <= 1:
                raise ConfigError(f"{path}: 'tiers.{name}.{key}' must be in [0, 1]")
        tiers[name] = tier
    return tiers


def assign_tiers(num_clients: int, names: Sequence[str], weights: Sequence[float]) -> list[str]:
    """A tier name per client index, drawn from the mix with a fixed seed."""
    p = np.asarray(weights, dtype=float)
    rng = np.random.default_rng(TIER_SEED)
    return [names[i] for i in rng.choice(len(names), size=num_clients, p=p / p.sum())]


def _draw(seed: int, rnd: int, client: int, salt: int) -> float:
    return float(np.random.default_rng([seed, rnd, client, salt]).random())


def is_available(tier: Tier, seed: int, rnd: int, client: int) -> bool:
    return _draw(seed, rnd, client, 1) < tier.availability


def drops_out(tier: Tier, seed: int, rnd: int, client: int) -> bool:
    return _draw(seed, rnd, client, 2) < tier.dropout


def simulated_seconds(tier: Tier, bytes_down: int, bytes_up: int, compute_s: float) -> float:
    """Download + compute on the device + upload, in seconds."""
    down = bytes_down * 8 / (tier.downlink_mbps * 1e6)
    up = bytes_up * 8 / (tier.uplink_mbps * 1e6)
    return down + compute_s * tier.slowdown + up


def round_policy(
    reports: Sequence[tuple[int, float]], deadline_s: float, keep: int
) -> tuple[list[int], dict[int, str]]:
    """Which reports a round keeps, on simulated time.

    ``reports`` are (client, simulated seconds). Reports later than ``deadline_s`` are
    stragglers; of the rest, the first ``keep`` by arrival (ties by client) are kept and
    later ones are surplus (over-selection). Returns the kept clients and a reason per
    discarded client.
    """
    ordered = sorted(reports, key=lambda r: (r[1], r[0]))
    kept: list[int] = []
    discarded: dict[int, str] = {}
    for client, seconds in ordered:
        if seconds > deadline_s:
            discarded[client] = f"straggler: {seconds:.1f} s > deadline {deadline_s:.1f} s"
        elif len(kept) >= keep:
            discarded[client] = f"surplus: {keep} faster reports already in"
        else:
            kept.append(client)
    return kept, discarded
