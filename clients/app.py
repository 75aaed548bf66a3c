"""fedtune's Flower ClientApp: trains the adapter on this node's client data.

Everything a node needs arrives in the message (the adapter and a config record with
the model, LoRA, data and client sections), so a SuperNode needs no scenario file;
which client it is comes from its node config (``partition-id``). The base model,
the population and the tokenized chunks stay in per-process caches: Ray actors live
across rounds, so each is built once per process.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune.attacks import attack_update, attackers
from fedtune.config import AttackConfig, DataConfig, LoraConfig, ModelConfig
from fedtune.data import build_population, client_train_chunks
from fedtune.engines import (
    ForwardSettings,
    ProbeSettings,
    ZerothSettings,
    engine_settings,
    get_engine,
)
from fedtune.engines.forward import ForwardEngine
from fedtune.errors import DataError
from fedtune.metrics import peak_rss_mb, reset_peak_rss
from fedtune.privacy.mod import privacy_mod
from fedtune.privacy.secagg import handle_stage
from fedtune.protocol import (
    ARRAYS_KEY,
    CLIENT_INDEX_KEY,
    GUIDE_KEY,
    INFO_KEY,
    METRICS_KEY,
    PARTITION_KEY,
    SECAGG_ACTION,
    SEED_WEIGHTS_KEY,
    SEEDS_KEY,
    WARM_ACTION,
    WARM_SECONDS_KEY,
    TrainInstructions,
    TrainReport,
)
from fedtune.wire import encode_update, from_record, seeds_from_record, seeds_to_record

app = ClientApp()


def client_index(context: Context) -> int:
    """This node's client index: its ``partition-id`` node config."""
    value = context.node_config.get(PARTITION_KEY)
    if not isinstance(value, int):
        raise DataError(
            f"node config has no integer '{PARTITION_KEY}' (start the SuperNode with "
            f"--node-config 'partition-id=N')"
        )
    return value


@functools.lru_cache(maxsize=2)
def _model(model: ModelConfig, lora: LoraConfig, seed: int, rank: int = 0) -> Any:
    from fedtune.models import load_lora_model

    return load_lora_model(model, lora, seed, rank)


@functools.lru_cache(maxsize=4)
def _attackers(data: DataConfig, attack: AttackConfig, seed: int) -> frozenset[int]:
    if attack.fraction == 0:
        return frozenset()
    return attackers(len(build_population(data).train), attack, seed)


@functools.lru_cache(maxsize=1)
def _tokenizer(name: str) -> Any:
    from fedtune.models import load_tokenizer

    return load_tokenizer(name)


@functools.lru_cache(maxsize=64)
def _chunks(
    data: DataConfig, model_name: str, seq_len: int, index: int, task: str = "causal-lm"
) -> Any:
    population = build_population(data)
    if index >= len(population.train):
        raise DataError(
            f"client index {index} is outside the population of {len(population.train)}"
        )
    tokenizer = _tokenizer(model_name)
    return client_train_chunks(tokenizer, population.train[index], data, seq_len, task)


def probe_settings(settings: Any, asked: TrainInstructions, message: Message) -> ProbeSettings:
    """The ``forward`` engine's settings for FwdLLM's probes: the directions asked for
    and, for discriminative sampling, the guide the server sent."""
    if not isinstance(settings, ForwardSettings):
        raise DataError(f"forward probes were asked of engine {asked.engine_name!r}")
    guide = message.content.array_records.get(GUIDE_KEY)
    values = {f: getattr(settings, f) for f in settings.__dataclass_fields__}
    return ProbeSettings(
        **values,
        probes=asked.probes,
        guide=tuple(seeds_from_record(guide)) if guide is not None else (),
        guide_sigmas=asked.guide_sigmas,
        guide_tries=asked.guide_tries,
    )


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which client this node is."""
    return Message(
        RecordDict({INFO_KEY: ConfigRecord({CLIENT_INDEX_KEY: client_index(context)})}),
        reply_to=message,
    )


@app.query(WARM_ACTION)
def warm(message: Message, context: Context) -> Message:
    """Load what a train message of this config needs (the base model with its adapter,
    the tokenizer, the population) into this process's caches, and say how long it took.

    ``fedtune simulate`` sends one to each Ray worker before round 1, while the server
    evaluates the initial adapter: the worker's start then overlaps that evaluation
    instead of lengthening round 1 (and eating into its deadline).
    """
    started = time.perf_counter()
    asked = TrainInstructions.of(message)
    scenario = asked.scenario
    _model(scenario.model, scenario.lora, scenario.run.seed, asked.lora_rank)
    _tokenizer(scenario.model.name)
    build_population(scenario.data)
    seconds = time.perf_counter() - started
    return Message(
        RecordDict({INFO_KEY: ConfigRecord({WARM_SECONDS_KEY: seconds})}), reply_to=message
    )


@app.query(SECAGG_ACTION)
def secagg(message: Message, context: Context) -> Message:
    """One stage of secure aggregation (keys, shares, unmask): fedtune.privacy.secagg."""
    return handle_stage(message, context)


@app.train(mods=[privacy_mod])  # clips, noises or masks the update as the server asks
def train(message: Message, context: Context) -> Message:
    """Load the global adapter, train it locally, reply with the update and metrics.

    A backprop or forward client replies with its adapter; a zeroth-order client with
    its seed steps only (:data:`~fedtune.protocol.SEEDS_KEY`), from which the server
    replays the adapter. A zeroth client may also receive, instead of the adapter, the
    seed steps that take the global adapter it kept to the current one (FedKSeed's
    catch-up, :func:`fedtune.clients.seed_history.catch_up`).
    """
    from fedtune.clients.local_state import keep_local, restore_local
    from fedtune.clients.seed_history import catch_up, keep_global
    from fedtune.models import adapter_state, load_adapter_state, merged_into_base, reset_adapter

    reset_peak_rss()
    index = client_index(context)
    asked = TrainInstructions.of(message)
    scenario = asked.scenario
    chunks = _chunks(
        scenario.data, scenario.model.name, scenario.client.seq_len, index, scenario.model.task
    )
    model = _model(scenario.model, scenario.lora, scenario.run.seed, asked.lora_rank)
    settings = engine_settings(
        asked.engine_name,
        scenario,
        seed=asked.client_seed(index),
        proximal_mu=asked.proximal_mu,
        train_only=asked.train_only,
    )
    weights = message.content.array_records.get(SEED_WEIGHTS_KEY)
    if weights is not None and isinstance(settings, ZerothSettings):  # FedKSeed-Pro
        probabilities = tuple(float(p) for p in weights["p"].numpy().tolist())
        settings = dataclasses.replace(settings, seed_probabilities=probabilities)
    if SEEDS_KEY in message.content.array_records:
        received = catch_up(context, asked, message.content.array_records[SEEDS_KEY], settings)
    else:
        received = from_record(message.content.array_records[ARRAYS_KEY])
    keep_global(context, asked, received)
    engine = get_engine(asked.engine_name)
    started, cpu_started = time.perf_counter(), time.process_time()
    if asked.probes:  # FwdLLM: forward-gradient probes at the global adapter, no step
        load_adapter_state(model, received)
        start = received
        update = ForwardEngine().probe(model, chunks, probe_settings(settings, asked, message))
    elif asked.fresh:
        # FLoRA: the global adapter joins the base weights; a fresh adapter trains on top.
        with merged_into_base(model, received, scenario.lora.alpha / scenario.lora.r):
            reset_adapter(model, settings.seed)
            start = adapter_state(model)
            update = engine.train(model, chunks, settings)
    else:
        load_adapter_state(model, restore_local(context, received, asked.local))
        start = adapter_state(model)
        update = engine.train(model, chunks, settings)
    keep_local(context, update.state, asked.local)
    attacker = index in _attackers(scenario.data, scenario.attack, scenario.run.seed)
    if attacker:
        update.state = attack_update(start, update.state, scenario.attack)
    report = TrainReport(
        num_examples=update.num_examples,
        loss=update.loss,
        compute_seconds=time.perf_counter() - started,
        # CPU seconds of every thread: what the training cost, whatever else ran.
        cpu_seconds=time.process_time() - cpu_started,
        peak_rss_mb=peak_rss_mb(),
        client_index=index,
        round=asked.round,
        extra=update.metrics,
    )
    if update.seed_steps is not None:  # seed-only upload: 8 bytes a step
        steps = update.seed_steps
        if attacker:  # the same attack on the steps: w_g - scale * (w - w_g)
            steps = [(i, float(np.float32(-scenario.attack.scale * g))) for i, g in steps]
        payload = {SEEDS_KEY: seeds_to_record(steps)}
    else:
        payload = {ARRAYS_KEY: encode_update(update.state, scenario.client.wire_dtype)}
    return Message(RecordDict({**payload, METRICS_KEY: report.to_metrics()}), reply_to=message)
