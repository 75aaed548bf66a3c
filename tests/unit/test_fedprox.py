"""FedProx end to end: the strategy sends ``proximal-mu``, the backprop engine honours it."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord

from fedtune.config import client_spec, load_scenario, scenario_from_client_spec
from fedtune.engines import get_engine
from fedtune.errors import ConfigError
from fedtune.models import adapter_state, load_adapter_state
from fedtune.protocol import CONFIG_KEY
from fedtune.strategies import build_strategy
from fedtune.wire import to_record

from ..conftest import engine_config
from .node_grid import NodeListGrid, task_identity


def test_fedprox_sends_mu_in_the_train_config():
    scenario = load_scenario("tiny")
    strategy = build_strategy("fedprox", {"proximal_mu": 0.25}, population=4, clients_per_round=2)
    adapter = {"w.lora_A.weight": torch.zeros(2, 3)}
    with task_identity():
        messages = list(
            strategy.configure_train(
                1,
                to_record(adapter),
                ConfigRecord({**client_spec(scenario), "round": 1}),
                NodeListGrid([11, 12, 13, 14]),
            )
        )
    assert len(messages) == 2
    for message in messages:
        config = message.content.config_records[CONFIG_KEY]
        assert config["proximal-mu"] == 0.25
        # The client rebuilds its scenario from the same record; the extra key is no error.
        assert scenario_from_client_spec(dict(config)).client == scenario.client


def test_proximal_term_keeps_the_adapter_near_the_global(tiny_peft, tokenizer):
    from fedtune.data import chunk_tokens

    chunks = chunk_tokens(tokenizer, "To be, or not to be: that is the question.\n" * 40, 32)
    start = adapter_state(tiny_peft)

    def train(mu: float):
        load_adapter_state(tiny_peft, start)
        config = engine_config(
            "backprop", lr=1e-2, local_steps=8, batch_size=2, seed=0, proximal_mu=mu
        )
        update = get_engine("backprop").train(tiny_peft, chunks, config)
        moved = sum(((update.state[k] - start[k]) ** 2).sum() for k in start) ** 0.5
        return update, float(moved)

    plain, plain_moved = train(0.0)
    prox, prox_moved = train(1.0)
    assert prox_moved < 0.5 * plain_moved
    # At the first step w == w_global: the term is zero, and the reported loss is the
    # task loss alone, comparable across strategies.
    assert prox.metrics["loss-first"] == plain.metrics["loss-first"]


@pytest.mark.parametrize("mu", [-0.1, float("nan")])
def test_bad_mu_is_refused(mu):
    with pytest.raises(ConfigError, match="proximal-mu must be >= 0"):
        engine_config("backprop", lr=1e-2, local_steps=1, batch_size=1, proximal_mu=mu)
