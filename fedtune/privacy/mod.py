"""The client's side of privacy: a Flower mod around the ClientApp's train function.

After training, the mod turns the reply into what may leave the device, as the server's
:class:`~fedtune.strategies.private.PrivateAggregation` asked in the train config:

- a clipping bound (:attr:`~fedtune.protocol.TrainInstructions.clip`, always when
  privacy is on): the update — the adapter trained minus the adapter received, on the
  LoRA factors the client trains — is clipped to that L2 norm;
- a noise multiplier (:attr:`~fedtune.protocol.TrainInstructions.noise`, local DP):
  ``N(0, (sigma C)^2)`` is added to every value of it;
- a secure-aggregation record (secure aggregation): the clipped update is quantized and masked
  (:func:`fedtune.privacy.secagg.mask_update`) and travels in place of the adapter.

Otherwise the reply carries the received adapter plus the (clipped, noised) update,
encoded as ``client.wire_dtype`` asks. A reply that is an error or does not decode is
passed on untouched: the server's validation rejects it with its reason.
"""

from __future__ import annotations

import math

import torch
from flwr.app import Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from fedtune.engines.seeds import trained_keys
from fedtune.models.lora import AdapterState
from fedtune.privacy.clipping import (
    add_noise,
    clip,
    difference,
    privatize_seed_steps,
    secret_generator,
)
from fedtune.privacy.secagg import COUNT_KEY, RECORD, mask_update
from fedtune.protocol import ARRAYS_KEY, METRICS_KEY, SEEDS_KEY, TrainInstructions
from fedtune.wire import (
    check_update,
    encode_update,
    expected_specs,
    from_record,
    seeds_from_record,
    seeds_to_record,
    to_record,
)

NO_SIZE_BOUND = 1 << 62


def privacy_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip, noise or mask the trained update before it leaves the client."""
    reply = call_next(message, context)
    asked = TrainInstructions.of(message)
    if asked.clip is None or reply.has_error():
        return reply
    received = from_record(message.content.array_records[ARRAYS_KEY])
    if SEEDS_KEY in reply.content.array_records:
        return _privatize_seed_reply(reply, asked, received)
    wire = asked.scenario.client.wire_dtype
    trained, _ = check_update(reply, expected_specs(received), NO_SIZE_BOUND, wire)
    if trained is None:
        return reply
    bound = asked.clip
    keys = trained_keys(received, asked.train_only)
    update, unclipped = clip(difference(trained, received, keys), bound)
    noise = asked.noise
    if noise > 0:
        update = add_noise(update, noise * bound, secret_generator())

    if RECORD in message.content.config_records:
        full = {k: update.get(k, torch.zeros_like(received[k])) for k in sorted(received)}
        masked = mask_update(context, message, [v.numpy() for v in full.values()], int(unclipped))
        reply.content[ARRAYS_KEY] = to_record(
            {
                k: torch.from_numpy(v.astype("float32"))
                for k, v in zip(full, masked[:-1], strict=True)
            }
        )
        metrics = dict(reply.content.metric_records[METRICS_KEY])
        reply.content[METRICS_KEY] = MetricRecord({**metrics, COUNT_KEY: int(masked[-1][0])})
    else:
        released = {**received, **{k: received[k] + update[k] for k in keys}}
        reply.content[ARRAYS_KEY] = encode_update(released, wire)
    return reply


def _privatize_seed_reply(
    reply: Message, asked: TrainInstructions, received: AdapterState
) -> Message:
    """Local DP for a seed-only reply: clip the vector of scalars and noise each (DPZero).

    The update the steps replay to is ``-lr * sum_j g_j z_j`` with ±1 directions over the
    ``d`` trained values, nearly orthogonal for distinct seeds, so its norm is about
    ``lr * sqrt(d) * ||g||``: the scalars are clipped to ``clip / (lr sqrt(d))`` so the
    replayed update stays near the adapter bound the server set. The noise multiplier —
    which alone fixes ε — applies to that scalar bound, so the release (the scalars; the
    seed indices depend on the client's seed, not its data) is exactly as private as an
    adapter update under the same multiplier. Central DP needs nothing here: the server
    clips and noises the replayed adapters.
    """
    noise = asked.noise
    if noise <= 0 or asked.clip is None:
        return reply
    keys = trained_keys(received, asked.train_only)
    values = sum(received[k].numel() for k in keys)
    lr = asked.scenario.client.lr
    bound = asked.clip / (lr * math.sqrt(values))
    steps = seeds_from_record(reply.content.array_records[SEEDS_KEY])
    reply.content[SEEDS_KEY] = seeds_to_record(
        privatize_seed_steps(steps, bound, noise, secret_generator())
    )
    return reply
