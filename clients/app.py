"""fedtune's Flower ClientApp: trains the adapter on this node's client data.

Everything a node needs arrives in the message (the adapter and a config record with
the model, LoRA, data and client sections), so a SuperNode needs no scenario file;
which client it is comes from its node config (``partition-id``). The base model,
the population and the tokenized chunks stay in per-process caches: Ray actors live
across rounds, so each is built once per process.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.attacks import attack_update, attackers
from fedtune.config import (
    AttackConfig,
    DataConfig,
    LoraConfig,
    ModelConfig,
    scenario_from_client_spec,
)
from fedtune.data import build_population, client_train_chunks
from fedtune.engines import EngineConfig, get_engine
from fedtune.errors import DataError
from fedtune.metrics import peak_rss_mb
from fedtune.privacy.mod import privacy_mod
from fedtune.privacy.secagg import ACTION as SECAGG_ACTION
from fedtune.privacy.secagg import handle_stage
from fedtune.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, WEIGHT_KEY, encode_update, from_record

PARTITION_KEY = "partition-id"
INFO_KEY = "info"

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
    from fedtune.models import attach_lora, load_base_model

    base = load_base_model(model.name, model.compute_dtype, model.num_layers, model.quantization)
    return attach_lora(base, lora, seed=seed, rank=rank)


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
def _chunks(data: DataConfig, model_name: str, seq_len: int, index: int) -> Any:
    population = build_population(data)
    if index >= len(population.train):
        raise DataError(
            f"client index {index} is outside the population of {len(population.train)}"
        )
    return client_train_chunks(_tokenizer(model_name), population.train[index], data, seq_len)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which client this node is."""
    return Message(
        RecordDict({INFO_KEY: ConfigRecord({"client-index": client_index(context)})}),
        reply_to=message,
    )


@app.query(SECAGG_ACTION)
def secagg(message: Message, context: Context) -> Message:
    """One stage of secure aggregation (keys, shares, unmask): fedtune.privacy.secagg."""
    return handle_stage(message, context)


@app.train(mods=[privacy_mod])  # clips, noises or masks the update as the server asks
def train(message: Message, context: Context) -> Message:
    """Load the global adapter, train it locally, reply with the update and metrics."""
    from fedtune.clients.local_state import keep_local, restore_local
    from fedtune.models import adapter_state, load_adapter_state, merged_into_base, reset_adapter

    index = client_index(context)
    config = message.content.config_records[CONFIG_KEY]
    scenario = scenario_from_client_spec(dict(config))
    rnd = int(config.get("round", config.get("server-round", 0)))
    chunks = _chunks(scenario.data, scenario.model.name, scenario.client.seq_len, index)
    # A device tier may train its own LoRA rank (strategies that mix ranks).
    rank = int(config.get("lora-rank", scenario.lora.r))
    model = _model(scenario.model, scenario.lora, scenario.run.seed, rank)
    local = str(config.get("lora-local", "none"))  # a LoRA factor this node keeps (FedSA-LoRA)
    received = from_record(message.content.array_records[ARRAYS_KEY])
    seed = int(np.random.SeedSequence([scenario.run.seed, rnd, index]).generate_state(1)[0])
    settings = EngineConfig(
        lr=scenario.client.lr,
        local_steps=scenario.client.local_steps,
        batch_size=scenario.client.batch_size,
        weight_decay=scenario.client.weight_decay,
        seed=seed,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        train_only=str(config.get("lora-train", "all")),
    )
    engine = get_engine(scenario.client.engine)
    started = time.perf_counter()
    if config.get("lora-fresh", False):
        # FLoRA: the global adapter joins the base weights; a fresh adapter trains on top.
        with merged_into_base(model, received, scenario.lora.alpha / scenario.lora.r):
            reset_adapter(model, seed)
            start = adapter_state(model)
            update = engine.train(model, chunks, settings)
    else:
        load_adapter_state(model, restore_local(context, received, local))
        start = adapter_state(model)
        update = engine.train(model, chunks, settings)
    keep_local(context, update.state, local)
    if index in _attackers(scenario.data, scenario.attack, scenario.run.seed):
        update.state = attack_update(start, update.state, scenario.attack)
    metrics = MetricRecord(
        {
            WEIGHT_KEY: update.num_examples,
            "loss": update.loss,
            "compute-seconds": time.perf_counter() - started,
            "peak-rss-mb": peak_rss_mb(),
            "client-index": index,
            "round": rnd,
            **update.metrics,
        }
    )
    return Message(
        RecordDict(
            {
                ARRAYS_KEY: encode_update(update.state, scenario.client.wire_dtype),
                METRICS_KEY: metrics,
            }
        ),
        reply_to=message,
    )
