"""Seed-only uploads and FedKSeed's catch-up: the wire check, the server's replay, the
strategy's aggregation and a client rebuilding the global adapter, on small adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedtune.clients.seed_history import catch_up, keep_global
from fedtune.config import load_scenario
from fedtune.engines.seeds import (
    adapter_digest,
    aggregate_steps,
    replay,
    seed_pool,
    seed_probabilities,
)
from fedtune.errors import ConfigError, DataError
from fedtune.protocol import (
    ARRAYS_KEY,
    CATCH_UP_KEY,
    CONFIG_KEY,
    DIGEST_KEY,
    ENGINE_KEY,
    METRICS_KEY,
    SEED_WEIGHTS_KEY,
    SEEDS_KEY,
    VERSION_KEY,
    WEIGHT_KEY,
    TrainInstructions,
)
from fedtune.server.loop import seeded_global_random
from fedtune.server.round import addressed, assign
from fedtune.server.seed_sync import SeedSync
from fedtune.strategies import build_strategy
from fedtune.wire import (
    check_seed_reply,
    from_record,
    recorddict_nbytes,
    seeds_to_record,
    to_record,
)

from ..conftest import engine_config
from .node_grid import NodeListGrid, federation, task_identity

K, LR, STEPS = 64, 0.01, 4
POOL = seed_pool(0, K)
ADAPTER = {
    "layers.0.q_proj.lora_A.weight": torch.randn(4, 32, generator=torch.Generator().manual_seed(1)),
    "layers.0.q_proj.lora_B.weight": torch.zeros(32, 4),
}
SPEC = {"run.seed": 0, "client.num_seeds": K, "client.lr": LR, "client.engine": "zeroth"}


@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


def seed_reply(steps, weight: int = 4, **arrays) -> Message:
    record = seeds_to_record(steps) if not arrays else ArrayRecord(arrays)
    content = RecordDict(
        {SEEDS_KEY: record, METRICS_KEY: MetricRecord({WEIGHT_KEY: weight, "loss": 1.0})}
    )
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def train_message(config: dict) -> Message:
    content = RecordDict({ARRAYS_KEY: to_record(ADAPTER), CONFIG_KEY: ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_a_seed_reply_is_a_few_hundred_bytes_and_passes_the_check():
    steps = [(3, 0.5), (63, -1.25), (0, 2.0), (3, 1e-3)]
    reply = seed_reply(steps)
    # 8 bytes a step; NumPy's .npy headers (~130 bytes an array) and metrics dominate.
    assert recorddict_nbytes(reply.content) < 500
    longer = recorddict_nbytes(seed_reply(steps * 100).content)
    grown = longer - recorddict_nbytes(reply.content)
    assert 8 * 396 <= grown <= 8 * 396 + 4  # + a longer length prefix per array
    got, reason = check_seed_reply(reply, K, STEPS)
    assert reason is None
    assert got == [(i, float(np.float32(g))) for i, g in steps]


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"index": [64], "scalar": [1.0]}, "outside the pool"),
        ({"index": [-1], "scalar": [1.0]}, "outside the pool"),
        ({"index": [1], "scalar": [float("nan")]}, "non-finite"),
        ({"index": [1] * 5, "scalar": [1.0] * 5}, "expected 1 to 4"),
        ({"index": [1, 2], "scalar": [1.0]}, "differ"),
    ],
)
def test_bad_seed_replies_are_rejected_with_a_reason(arrays, needle):
    typed = {
        "index": Array(np.array(arrays["index"], dtype=np.int32)),
        "scalar": Array(np.array(arrays["scalar"], dtype=np.float32)),
    }
    steps, reason = check_seed_reply(seed_reply(None, **typed), K, STEPS)
    assert steps is None and needle in reason


def test_wrong_dtypes_and_an_adapter_instead_of_steps_are_rejected():
    as_float = {
        "index": Array(np.array([1.0], dtype=np.float32)),
        "scalar": Array(np.array([1.0], dtype=np.float32)),
    }
    assert "int32 and float32" in check_seed_reply(seed_reply(None, **as_float), K, STEPS)[1]
    adapter = Message(
        RecordDict({ARRAYS_KEY: to_record(ADAPTER), METRICS_KEY: MetricRecord({WEIGHT_KEY: 1})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    assert "seed-steps" in check_seed_reply(adapter, K, STEPS)[1]


class History:
    """A strategy that keeps seed steps (as fedkseed does): only its history matters."""

    def __init__(self, history):
        self.seed_history = history


def offered(sync: SeedSync, state, history) -> Message:
    """A zeroth client's message as the loop's assign step makes it (client 5)."""
    message = train_message(SPEC)
    content = RecordDict(dict(message.content.items()))
    asked = TrainInstructions.of(message).but(engine="zeroth")
    return addressed(message, sync.offer(asked, content, 5, state, history), content)


def test_the_server_sends_the_steps_since_the_version_a_client_holds():
    sync = SeedSync(0, K, LR, STEPS)
    history = [[(1, 0.5), (2, -0.5)], [(7, 1.0)]]
    state = replay(ADAPTER, [s for h in history for s in h], POOL, LR)
    # A client never heard from gets the adapter, told its version.
    first = offered(sync, state, history)
    config = first.content.config_records[CONFIG_KEY]
    assert (
        ARRAYS_KEY in first.content and config[VERSION_KEY] == 2 and config[ENGINE_KEY] == "zeroth"
    )
    # Once it replied to version 1, it gets version 2's steps and the digest instead.
    sync.held[5] = 1
    second = offered(sync, state, history)
    config = second.content.config_records[CONFIG_KEY]
    assert ARRAYS_KEY not in second.content and config[CATCH_UP_KEY] == 1
    assert config[DIGEST_KEY] == adapter_digest(state)
    assert recorddict_nbytes(second.content) < recorddict_nbytes(first.content)


@pytest.mark.parametrize(("engine", "strategy"), [("backprop", "fedavg"), ("zeroth", "fedavg")])
def test_the_adapter_goes_whole_without_a_seed_history(engine, strategy):
    """A backprop client, or a strategy that keeps no seed steps: the adapter, unversioned."""
    scenario = load_scenario("tiny", [f"client.engine={engine}"])
    fed = federation(build_strategy(strategy, {}, 2, 1), scenario, {1: 0, 2: 1}, adapter=ADAPTER)
    fed.seeds.held[0] = 0
    with task_identity():
        (sent,) = assign(fed, 1, [train_message(SPEC)], ADAPTER)
    config = sent.message.content.config_records[CONFIG_KEY]
    assert ARRAYS_KEY in sent.message.content and VERSION_KEY not in config
    assert config[ENGINE_KEY] == engine


def test_the_client_rebuilds_the_global_adapter_bit_for_bit_or_refuses():
    history = [[(1, 0.5), (2, -0.5)], [(7, 1.0)]]
    version_1 = replay(ADAPTER, history[0], POOL, LR)
    version_2 = replay(version_1, history[1], POOL, LR)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    settings = engine_config(
        "zeroth", lr=LR, local_steps=STEPS, batch_size=1, num_seeds=K, run_seed=0
    )
    asked = TrainInstructions.from_config({CATCH_UP_KEY: 1, DIGEST_KEY: adapter_digest(version_2)})
    with pytest.raises(DataError, match="none kept"):
        catch_up(context, asked, seeds_to_record(history[1]), settings)
    keep_global(context, TrainInstructions.from_config({VERSION_KEY: 1}), version_1)
    rebuilt = catch_up(context, asked, seeds_to_record(history[1]), settings)
    assert all(torch.equal(rebuilt[k], version_2[k]) for k in version_2)
    with pytest.raises(DataError, match="differs from the server's"):
        catch_up(context, asked, seeds_to_record([(7, 1.5)]), settings)
    keep_global(context, TrainInstructions.from_config({VERSION_KEY: 0}), ADAPTER)
    with pytest.raises(DataError, match="holds 0"):
        catch_up(context, asked, seeds_to_record(history[1]), settings)


def test_the_server_replays_a_reply_on_the_adapter_it_sent():
    sync = SeedSync(0, K, LR, STEPS)
    sent = TrainInstructions.from_config({**SPEC, VERSION_KEY: 3})
    steps = [(5, 0.25), (9, -2.0)]
    adapter, got, reason = sync.receive(sent, seed_reply(steps), 2, ADAPTER)
    assert reason is None and got == steps and sync.held[2] == 3
    expected = replay(ADAPTER, steps, POOL, LR)
    assert all(torch.equal(adapter[k], expected[k]) for k in expected)
    huge = [(5, 3e38), (5, 3e38)]  # finite scalars, an overflowing step
    assert (
        "non-finite" in SeedSync(0, K, 100.0, STEPS).receive(sent, seed_reply(huge), 2, ADAPTER)[2]
    )


def _fedkseed_round(strategy, adapter, replies):
    config = ConfigRecord({**SPEC, "round": 1})
    with seeded_global_random(0, 1):
        list(strategy.configure_train(1, to_record(adapter), config, NodeListGrid(range(1, 5))))
    messages = []
    for steps, weight in replies:
        message = seed_reply(steps, weight)
        adapter_i = replay(adapter, steps, POOL, LR)
        SeedSync.for_strategy(message, steps)
        message.content[ARRAYS_KEY] = to_record(adapter_i)
        messages.append(message)
    arrays, _ = strategy.aggregate_train(1, messages)
    return from_record(arrays)


def test_fedkseed_replays_the_weighted_steps_which_is_fedavg_up_to_rounding():
    strategy = build_strategy("fedkseed", {}, population=4, clients_per_round=2)
    replies = [([(1, 0.5), (2, -1.0)], 2), ([(2, 1.0), (3, 0.25)], 6)]
    out = _fedkseed_round(strategy, ADAPTER, replies)
    merged = aggregate_steps([s for s, _ in replies], [w for _, w in replies])
    assert strategy.seed_history == [merged]
    assert all(torch.equal(out[k], replay(ADAPTER, merged, POOL, LR)[k]) for k in out)
    fedavg = {k: sum(w * replay(ADAPTER, s, POOL, LR)[k] for s, w in replies) / 8 for k in ADAPTER}
    assert all(torch.allclose(out[k], fedavg[k], atol=1e-7) for k in out)
    # A checkpoint keeps the history; a new strategy picks it up.
    again = build_strategy("fedkseed", {}, population=4, clients_per_round=2)
    again.load_state_dict(strategy.state_dict())
    assert again.seed_history == strategy.seed_history


def test_fedkseed_refuses_an_engine_that_does_not_send_seed_steps():
    strategy = build_strategy("fedkseed", {}, population=4, clients_per_round=2)
    config = ConfigRecord({**SPEC, "client.engine": "backprop"})
    with pytest.raises(ConfigError, match="client.engine = 'zeroth'"):
        strategy.configure_train(1, to_record(ADAPTER), config, NodeListGrid(range(1, 5)))


def test_fedkseed_pro_probabilities_follow_each_seeds_mean_amplitude():
    history = [[(1, 2.0), (2, -0.5)], [(1, -4.0)]]
    # Amplitudes: seed 1 -> 3, seed 2 -> 0.5, unused seeds -> their mean 1.75;
    # min-max normalized to 1, 0 and 0.5; probabilities are their softmax.
    p = seed_probabilities(history, 4)
    e = np.exp([0.5, 1.0, 0.0, 0.5])
    assert np.allclose(p, e / e.sum())
    assert seed_probabilities([], 4) is None


def test_fedkseed_pro_sends_the_probabilities_once_there_is_a_history():
    strategy = build_strategy("fedkseed", {"importance": True}, population=4, clients_per_round=2)
    config = ConfigRecord({**SPEC, "round": 1})
    with seeded_global_random(0, 1):
        first = list(
            strategy.configure_train(1, to_record(ADAPTER), config, NodeListGrid(range(1, 5)))
        )
    assert all(SEED_WEIGHTS_KEY not in m.content.array_records for m in first)
    strategy.seed_history.append([(3, 1.0), (7, -0.25)])
    with seeded_global_random(0, 2):
        second = list(
            strategy.configure_train(2, to_record(ADAPTER), config, NodeListGrid(range(1, 5)))
        )
    for message in second:
        p = message.content.array_records[SEED_WEIGHTS_KEY]["p"].numpy()
        assert p.shape == (K,) and p.dtype == np.float32 and np.isclose(p.sum(), 1.0)
        assert p[3] == p.max() and p[7] == p.min()
