"""A LoRA factor kept on the client (FedSA-LoRA), and B-only training (FFA-LoRA), on the client.

``clients.local_state`` is tested with real Flower ``Context`` objects and the tiny
model; then the real ClientApp train handler runs two rounds on one node's context
with messages built by the strategies themselves.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedtune.clients.app import train as train_handler
from fedtune.clients.local_state import STATE_KEY, keep_local, restore_local
from fedtune.config import client_spec, load_scenario
from fedtune.engines import get_engine
from fedtune.errors import ConfigError
from fedtune.models import adapter_state, load_adapter_state
from fedtune.protocol import ARRAYS_KEY, TrainInstructions, traits_of
from fedtune.server.round import addressed, with_traits
from fedtune.strategies import build_strategy
from fedtune.wire import from_record, to_record

from ..conftest import engine_config
from .node_grid import NodeListGrid, task_identity


def node_context(partition: int = 0) -> Context:
    return Context(
        run_id=1,
        node_id=101,
        node_config={"partition-id": partition},
        state=RecordDict(),
        run_config={},
    )


def shifted(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``state`` plus seeded noise on every tensor (a "new global adapter")."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def of_part(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if f"lora_{part}" in k}


def test_nothing_is_kept_or_restored_without_a_part(tiny_peft):
    context = node_context()
    state = adapter_state(tiny_peft)
    keep_local(context, state, "none")
    assert STATE_KEY not in context.state.array_records
    assert restore_local(context, shifted(state, 1), "none").keys() == state.keys()


def test_first_round_uses_what_was_received(tiny_peft):
    received = shifted(adapter_state(tiny_peft), 1)
    out = restore_local(node_context(), received, "B")
    assert all(torch.equal(out[k], received[k]) for k in received)


def test_kept_b_replaces_the_received_b_in_later_rounds(tiny_peft, tokenizer):
    from fedtune.data import chunk_tokens

    context = node_context()
    chunks = chunk_tokens(tokenizer, "To be, or not to be: that is the question.\n" * 40, 32)
    engine, config = (
        get_engine("backprop"),
        engine_config("backprop", lr=1e-2, local_steps=2, batch_size=2),
    )

    first = shifted(adapter_state(tiny_peft), 1)
    load_adapter_state(tiny_peft, restore_local(context, first, "B"))
    trained = engine.train(tiny_peft, chunks, config).state
    keep_local(context, trained, "B")
    kept = from_record(context.state.array_records[STATE_KEY])
    assert sorted(kept) == sorted(of_part(trained, "B")) and kept
    assert all(torch.equal(kept[k], trained[k]) for k in kept)

    second = shifted(adapter_state(tiny_peft), 2)  # the server's next global adapter
    load_adapter_state(tiny_peft, restore_local(context, second, "B"))
    loaded = adapter_state(tiny_peft)
    for key in loaded:
        expected = trained[key] if "lora_B" in key else second[key]
        assert torch.equal(loaded[key], expected), key


def test_kept_tensors_that_do_not_fit_are_ignored(tiny_peft):
    context = node_context()
    state = adapter_state(tiny_peft)
    keep_local(context, {k: torch.zeros(1) for k in of_part(state, "B")}, "B")
    out = restore_local(context, state, "B")
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_a_bad_part_is_refused(tiny_peft):
    with pytest.raises(ConfigError, match="lora-local must be one of none, A, B, got 'C'"):
        restore_local(node_context(), adapter_state(tiny_peft), "C")


# ------------------------------------------------------- the real train handler, two rounds


def messages(name: str, rnd: int, adapter: dict[str, torch.Tensor], lr: float) -> list:
    scenario = load_scenario("tiny", [f"client.lr={lr}"])
    strategy = build_strategy(name, {}, population=1, clients_per_round=1)
    config = ConfigRecord({**client_spec(scenario), "round": rnd})
    traits = traits_of(strategy)
    with task_identity():
        sampled = strategy.configure_train(rnd, to_record(adapter), config, NodeListGrid([7]))
        # What the loop's assign step adds for every client: the strategy's traits.
        return [addressed(m, with_traits(TrainInstructions.of(m), traits)) for m in sampled]


def handler_round(name: str, rnd: int, adapter, context, lr: float) -> dict[str, torch.Tensor]:
    (message,) = messages(name, rnd, adapter, lr)
    with task_identity():
        reply = train_handler(message, context)
    assert not reply.has_error()
    return from_record(reply.content.array_records[ARRAYS_KEY])


def tiny_adapter() -> dict[str, torch.Tensor]:
    from fedtune.models import attach_lora, load_base_model

    scenario = load_scenario("tiny")
    model = attach_lora(load_base_model(scenario.model.name), scenario.lora, seed=0)
    return adapter_state(model)


def test_handler_keeps_b_between_rounds_under_fedsa_lora():
    # With client.lr = 1e-9 a reply is the adapter its round started from (to ~1e-8):
    # round 2 must start from the received A and from this node's own B of round 1.
    context = node_context(partition=0)
    first = shifted(tiny_adapter(), 1)
    out1 = handler_round("fedsa-lora", 1, first, context, lr=1e-9)
    second = shifted(first, 2)
    out2 = handler_round("fedsa-lora", 2, second, context, lr=1e-9)
    for key in out2:
        started = out1[key] if "lora_B" in key else second[key]
        other = second[key] if "lora_B" in key else out1[key]
        torch.testing.assert_close(out2[key], started, rtol=0, atol=1e-6)
        assert (out2[key] - other).abs().max() > 1e-3, key


def test_handler_trains_only_b_under_ffa_lora():
    context = node_context(partition=1)
    sent = shifted(tiny_adapter(), 3)
    out = handler_round("ffa-lora", 1, sent, context, lr=5e-3)
    for key in sent:
        if "lora_A" in key:
            assert torch.equal(out[key], sent[key]), key  # bit for bit
        else:
            assert not torch.equal(out[key], sent[key]), key
    assert STATE_KEY not in context.state.array_records
