"""The server <-> client protocol: every Flower message key and its default, in one place.

A train message carries the adapter (:data:`ARRAYS_KEY`, or FedKSeed's catch-up steps
under :data:`SEEDS_KEY`) and one config record (:data:`CONFIG_KEY`) that
:class:`TrainInstructions` writes and reads: the client's part of the scenario as flat
``section.key`` values (:func:`fedtune.config.client_spec`, so a node needs no scenario
file) plus what this message asks of this client — its engine, LoRA rank, which factor
it trains, the adapter version it will hold. A reply carries the update (or seed steps)
and one metric record that :class:`TrainReport` writes and reads.

The ClientApp, the round loop, the device gateway, strategies and the privacy wrappers
read keys from here and nowhere else; Flower's own keys (``server-round``, FedProx's
``proximal-mu``) are named here too, because fedtune reads them.

This module imports neither torch nor flwr at import time: the device client (no torch,
no flwr) shares its constants.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from flwr.app import ConfigRecord, Message, MetricRecord

    from fedtune.config import Scenario

# -- record keys of a message's RecordDict ------------------------------------------------
ARRAYS_KEY = "arrays"
"""The adapter (the key Flower's strategies read and write)."""
CONFIG_KEY = "config"
"""The train config (Flower's strategies write it)."""
METRICS_KEY = "metrics"
"""The reply's metrics."""
SEEDS_KEY = "seed-steps"
"""Seed steps of a zeroth-order client (int32 indices, fp32 scalars): its upload, or the
server's catch-up steps in place of the adapter."""
INFO_KEY = "info"
"""Discovery: a query with this record asks a node which client it is."""
SEED_WEIGHTS_KEY = "seed-probabilities"
"""FedKSeed-Pro: the probability of each seed of the pool (float32, K), with which a
zeroth client draws its steps' seeds (absent: uniformly)."""
GUIDE_KEY = "guide"
"""FwdLLM's discriminative sampling: the previous aggregation's merged seed steps (as
:data:`SEEDS_KEY`), from which a client rebuilds the last global gradient estimate."""

# -- node config ------------------------------------------------------------------------
PARTITION_KEY = "partition-id"
"""A SuperNode's ``--node-config``: the client index it serves."""

# -- train-config keys: per message -------------------------------------------------------
ROUND_KEY = "round"
FLOWER_ROUND_KEY = "server-round"
"""What Flower's FedAvg family writes into the config it is given."""
ENGINE_KEY = "client-engine"
RANK_KEY = "lora-rank"
TRAIN_KEY = "lora-train"
FRESH_KEY = "lora-fresh"
LOCAL_KEY = "lora-local"
PROXIMAL_KEY = "proximal-mu"
"""Flower's FedProx writes it; the ClientApp adds the proximal term."""
VERSION_KEY = "adapter-version"
CATCH_UP_KEY = "catch-up-from"
DIGEST_KEY = "adapter-digest"
PROBES_KEY = "forward-probes"
GUIDE_SIGMAS_KEY = "guide-sigmas"
GUIDE_TRIES_KEY = "guide-tries"
CLIP_KEY = "privacy-clip"
NOISE_KEY = "privacy-noise"

# -- reply metric keys ----------------------------------------------------------------------
WEIGHT_KEY = "num-examples"
"""The metric Flower's FedAvg family weights by."""
CLIENT_INDEX_KEY = "client-index"
LOSS_FIRST_KEY = "loss-first"
"""Every engine's (and phone's) loss of its first local step: comparable across
strategies, as the adapter is then the one sent."""
LOSS_LAST_KEY = "loss-last"

# -- warm-up (a query message before round 1: simulation's workers load the model) ------
WARM_ACTION = "warm"
"""Load the model, tokenizer and population a train message would need, and reply.
The config record is a train config's (:class:`TrainInstructions`, round 0)."""
WARM_SECONDS_KEY = "warm-seconds"

# -- secure aggregation (a query-message stage protocol, fedtune.privacy.secagg) ---------
SECAGG_ACTION = "secagg"
SECAGG_RECORD = "secagg"
SECAGG_COUNT_KEY = "secagg-unclipped"

# -- phones (the gRPC DeviceService, fedtune/ondevice/proto) --------------------------------
PROTOCOL_VERSION = 1
"""Version of ``fedtune.device.v1`` that gateway and device client speak."""
ERROR_KEY = "fedtune-error-bin"
"""gRPC trailing-metadata key of a refused call's serialized ``ErrorDetail``."""
ERROR_REPLY_CODE = 400
"""Flower ``Error`` code of a client's or phone's refused task (the loop logs why)."""
DECLINED_REPLY_CODE = 410
"""Flower ``Error`` code of a task its device declined or failed (counted as dropped)."""
MAX_PROBES = 1024
"""The most forward-gradient directions one message may ask of a client."""
MAX_UPDATE_FACTOR = 4
"""An update may be at most this many times the fp32 size of the adapter sent."""

TRAIN_ONLY = ("all", "A", "B")
"""Values of :attr:`TrainInstructions.train_only`."""
LOCAL_PARTS = ("none", "A", "B")
"""Values of :attr:`TrainInstructions.local`."""
SEED_STEP_ENGINES = ("zeroth", "forward")
"""Engines whose replies can be seed steps (``forward`` only when asked for probes)."""
GUIDE_TRIES = 32
"""Default candidates a client draws per direction under discriminative sampling."""


@dataclass(frozen=True)
class StrategyTraits:
    """What a strategy needs of the federation, declared by its class (``traits = ...``).

    The round loop turns traits into :class:`TrainInstructions`, and
    :mod:`fedtune.checks` refuses, before any process starts, a scenario a strategy's
    traits cannot serve. A plain Flower strategy declares nothing: it gets the defaults.
    """

    mixed_ranks: bool = False
    """Aggregates adapters of several LoRA ranks; the class has ``download(arrays,
    rank) -> ArrayRecord``, what a client of ``rank`` starts from."""
    seed_steps: bool = False
    """Aggregates zeroth-order clients' seed steps and keeps ``seed_history`` (the
    merged steps of each aggregation), from which clients catch up."""
    trains: str = "all"
    """The LoRA factor clients train (FFA-LoRA: ``B``)."""
    keeps_local: str = "none"
    """The LoRA factor each client keeps for itself (FedSA-LoRA: ``B``)."""
    fresh_adapter: bool = False
    """Clients merge the received adapter into their base and train a fresh one (FLoRA)."""
    per_client: bool = False
    """Aggregates each client's update on its own (order statistics, distances: median,
    trimmed mean, Krum), so a private or securely summed mean cannot feed it."""
    seed_engine: str = "zeroth"
    """With :attr:`seed_steps`: the engine whose seed steps it aggregates (``zeroth``:
    local MeZO steps; ``forward``: FwdLLM's forward-gradient probes at the global
    adapter, :attr:`TrainInstructions.probes`)."""
    paced: bool = False
    """Asks for more clients within a round while its pooled estimate is too noisy: the
    class has ``more_clients(server_round, replies, asked) -> int`` (FwdLLM's pacing)."""

    def __post_init__(self) -> None:
        if self.trains not in TRAIN_ONLY:
            raise ValueError(f"trains must be one of {', '.join(TRAIN_ONLY)}")
        if self.keeps_local not in LOCAL_PARTS:
            raise ValueError(f"keeps_local must be one of {', '.join(LOCAL_PARTS)}")
        if self.seed_engine not in SEED_STEP_ENGINES:
            raise ValueError(f"seed_engine must be one of {', '.join(SEED_STEP_ENGINES)}")

    @property
    def replays_on_sent(self) -> bool:
        """Whether a client's update is a change of the adapter it was sent (what seed
        steps replay on): not when it keeps a factor or trains a fresh adapter."""
        return not self.fresh_adapter and self.keeps_local == "none"


PLAIN = StrategyTraits()


@runtime_checkable
class StatefulStrategy(Protocol):
    """A strategy that says what of it a checkpoint keeps (plain types and tensors).

    Without these, :func:`fedtune.checkpoint.strategy_state` keeps the instance
    attributes that are arrays or plain values and are not constructor parameters.
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def traits_of(strategy: object) -> StrategyTraits:
    """The traits a strategy declares; a plain Flower strategy has :data:`PLAIN`, except
    Flower's robust rules, which need every client's update (``per_client``)."""
    traits = getattr(strategy, "traits", None)
    if traits is None:
        from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum

        robust = isinstance(strategy, (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan))
        return StrategyTraits(per_client=True) if robust else PLAIN
    if not isinstance(traits, StrategyTraits):
        raise TypeError(
            f"{type(strategy).__name__}.traits must be a fedtune.protocol.StrategyTraits"
        )
    return traits


@dataclass(frozen=True)
class TrainInstructions:
    """What one train message asks of one client: the only reader and writer of the
    train config's keys.

    Keys the protocol does not know (a plug-in strategy's own) travel in :attr:`extra`,
    untouched.
    """

    round: int
    """The server round."""
    spec: Mapping[str, Any]
    """The client's part of the scenario, flat ``section.key`` values."""
    engine: str = ""
    """The engine this client trains with ("": ``client.engine`` of :attr:`spec`; the
    loop always names it, per tier under ``auto``)."""
    rank: int = 0
    """The LoRA rank this client trains (0: ``lora.r``; device tiers may differ)."""
    train_only: str = "all"
    """The LoRA factor trained (FFA-LoRA: ``B``); the other stays as received."""
    fresh: bool = False
    """FLoRA: merge the received adapter into the base and train a fresh one on top."""
    local: str = "none"
    """FedSA-LoRA: the LoRA factor this node keeps for itself (``B``)."""
    proximal_mu: float = 0.0
    """FedProx's proximal term weight (0: off)."""
    adapter_version: int | None = None
    """Seed-step strategies: the version of the adapter this client will hold."""
    catch_up_from: int | None = None
    """Seed-step catch-up: the version the steps sent start from (no adapter sent)."""
    adapter_digest: str = ""
    """Seed-step catch-up: the digest of the adapter the steps must rebuild."""
    probes: int = 0
    """FwdLLM (``forward`` engine): evaluate this many forward-gradient directions at the
    adapter received — no local step — and reply ``(seed index, directional
    derivative)`` per direction as seed steps (0: train locally)."""
    guide_sigmas: float = 0.0
    """FwdLLM's discriminative sampling: keep a candidate direction ``z`` only when
    ``|<z, g>| / ||g||`` (its cosine with the guide ``g`` in units of a random
    direction's, ``1/sqrt(D)``) is at least this (0: uniform directions)."""
    guide_tries: int = GUIDE_TRIES
    """Candidates drawn per kept direction before giving up on it."""
    clip: float | None = None
    """Privacy: the L2 bound of this client's update (None: not clipped on the client)."""
    noise: float = 0.0
    """Privacy: the local noise multiplier (local DP)."""
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """Keys of the config this protocol does not define, passed through."""

    def __post_init__(self) -> None:
        if self.train_only not in TRAIN_ONLY:
            raise ValueError(
                f"{TRAIN_KEY} must be one of {', '.join(TRAIN_ONLY)}, got {self.train_only!r}"
            )
        if self.local not in LOCAL_PARTS:
            raise ValueError(
                f"{LOCAL_KEY} must be one of {', '.join(LOCAL_PARTS)}, got {self.local!r}"
            )
        if not self.proximal_mu >= 0:
            raise ValueError(f"{PROXIMAL_KEY} must be >= 0, got {self.proximal_mu!r}")
        if not 0 <= self.probes <= MAX_PROBES:
            raise ValueError(f"{PROBES_KEY} must be in [0, {MAX_PROBES}], got {self.probes!r}")
        if not 0 <= self.guide_sigmas <= 10:
            raise ValueError(f"{GUIDE_SIGMAS_KEY} must be in [0, 10], got {self.guide_sigmas!r}")
        if not 1 <= self.guide_tries <= 1024:
            raise ValueError(f"{GUIDE_TRIES_KEY} must be in [1, 1024], got {self.guide_tries!r}")

    # -- derived values ------------------------------------------------------------------
    @functools.cached_property
    def scenario(self) -> Scenario:
        """The client's part of the scenario, rebuilt and validated."""
        from fedtune.config import scenario_from_client_spec

        return scenario_from_client_spec(self.spec)

    @property
    def engine_name(self) -> str:
        return self.engine or str(self.spec.get("client.engine", "backprop"))

    @property
    def lora_rank(self) -> int:
        return self.rank or int(self.spec.get("lora.r", 0))

    @property
    def examples(self) -> int:
        """The sequences this message asks for (local steps x batch size; one batch per
        direction for probes): the client's aggregation weight, whatever it reports."""
        client = self.scenario.client
        return (self.probes or client.local_steps) * client.batch_size

    @property
    def uploads_seeds(self) -> bool:
        """Whether the reply asked for is seed steps rather than an adapter."""
        return self.engine_name == "zeroth" or (self.engine_name == "forward" and self.probes > 0)

    def client_seed(self, client: int) -> int:
        """The seed of this client-round: batches, dropout and perturbations."""
        import numpy as np

        run_seed = int(self.spec.get("run.seed", 0))
        return int(np.random.SeedSequence([run_seed, self.round, client]).generate_state(1)[0])

    def but(self, **changes: Any) -> TrainInstructions:
        """A copy with ``changes`` (instructions are frozen)."""
        return replace(self, **changes)

    # -- the wire -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config values; a key at its default is left out."""
        items: dict[str, Any] = {**self.extra, **self.spec, ROUND_KEY: self.round}
        for name, key in _FIELD_KEYS.items():
            value = getattr(self, name)
            if value != _DEFAULTS[name]:
                items[key] = value
        return items

    def to_config(self) -> ConfigRecord:
        from flwr.app import ConfigRecord

        return ConfigRecord(self.to_dict())

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainInstructions:
        """Read a train config (a ConfigRecord or a plain mapping)."""
        items = dict(config)
        rnd = items.pop(ROUND_KEY, items.pop(FLOWER_ROUND_KEY, 0))
        items.pop(FLOWER_ROUND_KEY, None)
        values: dict[str, Any] = {}
        for name, key in _FIELD_KEYS.items():
            if key in items:
                values[name] = _TYPES[name](items.pop(key))
        spec = {k: v for k, v in items.items() if "." in k}
        extra = {k: v for k, v in items.items() if "." not in k}
        return cls(
            round=int(rnd),
            spec=MappingProxyType(spec),
            extra=MappingProxyType(extra),
            **values,
        )

    @classmethod
    def of(cls, message: Message) -> TrainInstructions:
        """The instructions of a train message."""
        return cls.from_config(message.content.config_records[CONFIG_KEY])


_FIELD_KEYS = {
    "engine": ENGINE_KEY,
    "rank": RANK_KEY,
    "train_only": TRAIN_KEY,
    "fresh": FRESH_KEY,
    "local": LOCAL_KEY,
    "proximal_mu": PROXIMAL_KEY,
    "adapter_version": VERSION_KEY,
    "catch_up_from": CATCH_UP_KEY,
    "adapter_digest": DIGEST_KEY,
    "probes": PROBES_KEY,
    "guide_sigmas": GUIDE_SIGMAS_KEY,
    "guide_tries": GUIDE_TRIES_KEY,
    "clip": CLIP_KEY,
    "noise": NOISE_KEY,
}
_DEFAULTS = {
    f.name: (f.default_factory() if callable(f.default_factory) else f.default)
    for f in fields(TrainInstructions)
    if f.name in _FIELD_KEYS
}
_TYPES: dict[str, Any] = {
    "engine": str,
    "rank": int,
    "train_only": str,
    "fresh": bool,
    "local": str,
    "proximal_mu": float,
    "adapter_version": int,
    "catch_up_from": int,
    "adapter_digest": str,
    "probes": int,
    "guide_sigmas": float,
    "guide_tries": int,
    "clip": float,
    "noise": float,
}


@dataclass(frozen=True)
class TrainReport:
    """The metrics of a train reply: what a ClientApp and the device gateway send.

    Flower's FedAvg refuses to aggregate replies whose metric keys differ, so every
    kind of client reports exactly these (plus the engine's own, in :attr:`extra`).
    Every figure is the client's claim: the server records it and bounds what it uses.
    """

    num_examples: int
    """Sequences trained on (the client's claim; the server weights by its own count)."""
    loss: float
    compute_seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    client_index: int
    round: int
    extra: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """Engine-specific numbers (``loss-first``, ``loss-last``, ...)."""

    def to_metrics(self) -> MetricRecord:
        from flwr.app import MetricRecord

        return MetricRecord(
            {
                WEIGHT_KEY: int(self.num_examples),
                "loss": float(self.loss),
                "compute-seconds": float(self.compute_seconds),
                "cpu-seconds": float(self.cpu_seconds),
                "peak-rss-mb": float(self.peak_rss_mb),
                CLIENT_INDEX_KEY: int(self.client_index),
                ROUND_KEY: int(self.round),
                **{k: float(v) for k, v in self.extra.items()},
            }
        )


MODEL_LOADS_KEY = "process-model-loads"
"""Reply metric (warm ClientApps, ``fedtune.clients.warm``): models the process that
trained has loaded so far."""
WARM_WORKER_KEY = "warm-worker"
"""Reply metric: 1 when a SuperNode's warm worker trained (also the node config key
that turns the worker off)."""

REPORT_EVENT_FIELDS = {
    "loss": "loss",
    WEIGHT_KEY: "num_examples",
    "compute-seconds": "compute_seconds",
    "cpu-seconds": "cpu_seconds",
    "peak-rss-mb": "peak_rss_mb",
    MODEL_LOADS_KEY: "model_loads",
    WARM_WORKER_KEY: "warm_worker",
}
"""Reply metric -> the ``client_update`` event field that records it."""


def reported(reply: Message, key: str, default: Any = None) -> Any:
    """One metric of a reply (``default`` when missing, or for an error reply)."""
    if reply.has_error() or METRICS_KEY not in reply.content.metric_records:
        return default
    return reply.content.metric_records[METRICS_KEY].get(key, default)


def report_fields(reply: Message) -> dict[str, Any]:
    """A reply's reported metrics as ``client_update`` event fields (None if missing;
    the warm worker's two only when reported)."""
    fields = {name: reported(reply, key) for key, name in REPORT_EVENT_FIELDS.items()}
    for key in (MODEL_LOADS_KEY, WARM_WORKER_KEY):
        if fields[REPORT_EVENT_FIELDS[key]] is None:
            del fields[REPORT_EVENT_FIELDS[key]]
    return fields
