"""Privacy for seed-only (zeroth-order) uploads: local DP on the scalars, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.config import load_scenario
from fedtune.engines.seeds import replay, seed_pool
from fedtune.errors import ConfigError
from fedtune.privacy.clipping import l2_norm
from fedtune.privacy.mod import privacy_mod
from fedtune.protocol import (
    ARRAYS_KEY,
    CLIP_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NOISE_KEY,
    SEEDS_KEY,
    WEIGHT_KEY,
)
from fedtune.wire import seeds_from_record, seeds_to_record, to_record

from .node_grid import task_identity

SENT = {
    "m.lora_A.weight": torch.full((8, 64), 0.01),
    "m.lora_B.weight": torch.zeros(64, 8),
}
STEPS = [(1, 40.0), (2, -30.0), (3, 25.0)]  # ||g|| ~ 56: far over the bound below
LR, CLIP = 1e-3, 0.05
client = ClientApp()


@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


@client.train(mods=[privacy_mod])
def train(message: Message, context: Context) -> Message:
    content = RecordDict(
        {SEEDS_KEY: seeds_to_record(STEPS), METRICS_KEY: MetricRecord({WEIGHT_KEY: 4})}
    )
    return Message(content, reply_to=message)


def _reply(noise: float) -> Message:
    config = {CLIP_KEY: CLIP, NOISE_KEY: noise, "client.lr": LR, "client.wire_dtype": "fp32"}
    message = Message(
        RecordDict({ARRAYS_KEY: to_record(SENT), CONFIG_KEY: ConfigRecord(config)}),
        dst_node_id=3,
        message_type="train",
    )
    return client(message, Context(1, 3, {}, RecordDict(), {}))


def test_local_dp_clips_the_scalars_so_the_replayed_update_is_near_the_bound():
    released = seeds_from_record(_reply(1e-9).content.array_records[SEEDS_KEY])
    assert [i for i, _ in released] == [i for i, _ in STEPS]  # indices are not data
    values = sum(v.numel() for v in SENT.values())
    scalar_bound = CLIP / (LR * math.sqrt(values))
    assert math.hypot(*(g for _, g in released)) == pytest.approx(scalar_bound, rel=1e-5)
    adapter = replay(SENT, released, seed_pool(0, 8), LR)
    update = {k: adapter[k] - SENT[k] for k in SENT}
    assert l2_norm(update) == pytest.approx(CLIP, rel=0.1)  # ±1 directions, nearly orthogonal


def test_local_dp_noise_on_the_scalars_has_the_asked_scale():
    values = sum(v.numel() for v in SENT.values())
    scalar_bound = CLIP / (LR * math.sqrt(values))
    draws = [g for _ in range(200) for _, g in seeds_from_record(_reply(1.0).content[SEEDS_KEY])]
    # Clipped scalars (<= the bound) plus N(0, bound^2): the spread is about the bound.
    spread = float(torch.tensor(draws).std())
    assert 0.8 * scalar_bound < spread < 1.4 * scalar_bound


def test_central_dp_leaves_the_steps_to_the_server():
    assert seeds_from_record(_reply(0.0).content[SEEDS_KEY]) == STEPS


@pytest.mark.parametrize("engine", ["zeroth", "auto"])
def test_secure_aggregation_is_refused_for_seed_uploads(engine):
    with pytest.raises(ConfigError, match="privacy.secure_aggregation"):
        load_scenario(
            "tiny",
            [
                f'client.engine="{engine}"',
                'privacy.mode="central"',
                "privacy.secure_aggregation=true",
            ],
        )
