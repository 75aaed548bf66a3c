"""Secure aggregation (SecAgg+): the server learns the sum of the updates, not one of them.

Keith Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017 (SecAgg); James Henry Bell et al., "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS 2020 (SecAgg+: each client pairs with ``k``
neighbours instead of everyone).

Flower 1.41 ships SecAgg+ only for its legacy strategy API (``SecAggPlusWorkflow``,
``secaggplus_mod``). This module runs the same protocol inside one fedtune round, from
Flower's primitives (``flwr.common.secure_aggregation``: Shamir shares, ECDH key
agreement and Fernet encryption, quantization, the mask generator), with the stages as
``query.secagg`` messages around the ordinary train message:

1. ``keys``: each sampled client makes two EC key pairs — one agrees the pairwise mask
   seeds, one the keys of the share channels — and replies the public halves.
2. ``shares``: each client receives its neighbours' public keys, draws a self-mask seed
   ``b``, splits ``b`` and its mask private key into Shamir shares (any ``t`` rebuild
   them) and replies one share of each per neighbour, encrypted for that neighbour.
3. train: the train message carries the shares addressed to the client. After training
   the client clips its update, quantizes it and replies
   ``q(update) + PRG(b) + sum_v ±PRG(s_uv)  (mod 2^24)`` in place of the update.
4. ``unmask``: each client that replied learns which neighbours replied and which
   dropped, and replies its shares of the survivors' ``b`` and of the dropped clients'
   mask keys. From ``t`` shares the server rebuilds them, removes every mask, and is
   left with ``sum_v q(update_v)``: nothing about any single update.

A client that drops after step 2 costs nothing but its own term; one that drops before
is left out of the masking altogether. Masked values stay below ``2^24``, so they are
exact in fp32: a masked update travels, and is validated by the round loop, exactly
like a plaintext one. Security model: an honest-but-curious server (as in Flower).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedtune.protocol import ROUND_KEY, SECAGG_ACTION, SECAGG_COUNT_KEY, SECAGG_RECORD

MODULUS = 1 << 24
"""Masked values live in Z_M; below 2^24 every one is exact in fp32."""
ACTION = SECAGG_ACTION
MESSAGE_TYPE = f"{MessageType.QUERY}.{ACTION}"
RECORD = SECAGG_RECORD
"""Key of the protocol's ConfigRecord in stage and train messages and in replies."""
STATE = "secagg-state"
"""Key of the client's protocol state in ``context.state.config_records``."""
COUNT_KEY = SECAGG_COUNT_KEY
"""Reply metric: the masked indicator "my update was within the clipping bound"."""
KEYS, SHARES, UNMASK = "keys", "shares", "unmask"

Vectors = list[np.ndarray]
Send = Callable[[list[Message]], dict[int, Message]]
"""Send messages, return the replies without error by source node."""


def neighbour_graph(nodes: Sequence[int], k: int, rng: np.random.Generator) -> dict[int, list[int]]:
    """Each node's neighbours, itself included (sorted): every node when ``k`` is 0 or
    covers them all, else a ring over a random order with ``k / 2`` on either side."""
    nodes = sorted(nodes)
    if k == 0 or k >= len(nodes) - 1:
        return {n: list(nodes) for n in nodes}
    order = [nodes[i] for i in rng.permutation(len(nodes))]
    half = k // 2
    return {
        n: sorted({order[(i + d) % len(order)] for d in range(-half, half + 1)})
        for i, n in enumerate(order)
    }


def threshold_for(shares: int, fraction: float) -> int:
    """Shares needed to rebuild a secret split in ``shares``: at least 2."""
    return min(shares, max(2, math.ceil(fraction * shares)))


def stage_message(node: int, rnd: int, stage: str, body: dict[str, Any]) -> Message:
    return Message(
        RecordDict({RECORD: ConfigRecord({"stage": stage, ROUND_KEY: rnd, **body})}),
        dst_node_id=node,
        message_type=MESSAGE_TYPE,
        group_id=str(rnd),
    )


def _agree(private: bytes, public: bytes) -> bytes:
    """ECDH + HKDF (Flower's ``generate_shared_key``): a 44-byte seed or Fernet key."""
    return generate_shared_key(bytes_to_private_key(private), bytes_to_public_key(public))


def _body(message: Message) -> dict[str, Any]:
    """The protocol record of a stage message or reply, as a plain dict."""
    return dict(message.content.config_records[RECORD])


def _shapes(vectors: Vectors) -> list[tuple[int, ...]]:
    return [tuple(v.shape) for v in vectors]


# ------------------------------------------------------------------------ server side


@dataclass
class SecAggRound:
    """The server's view of one round of the protocol."""

    rnd: int
    threshold: int
    neighbours: dict[int, list[int]]
    public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    """Nodes that finished ``keys``: their (mask, channel) public keys."""
    forwarded: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    """Nodes that finished ``shares``: the (source, ciphertext) shares addressed to them."""

    @property
    def levels(self) -> int:
        """Quantization levels: the sum of every participant's values stays below M."""
        return (MODULUS - 1) // max(len(self.forwarded), 1)

    def train_record(self, node: int, clip: float) -> ConfigRecord:
        """What the train message for ``node`` carries: its shares and how to quantize."""
        sources = self.forwarded[node]
        return ConfigRecord(
            {
                ROUND_KEY: self.rnd,
                "sources": [src for src, _ in sources],
                "ciphertexts": [ciphertext for _, ciphertext in sources],
                "levels": self.levels,
                "range": clip,
            }
        )

    def unmask(self, masked: dict[int, Vectors], clip: float, send: Send) -> Vectors | None:
        """The sum of the updates of ``masked``'s nodes (fp64), or None if it cannot be
        rebuilt (fewer than ``threshold`` shares of some secret arrived).

        ``masked`` holds each replying node's masked vectors; the last vector of each is
        the one-value count of updates within the clipping bound.
        """
        active = set(masked)
        dropped = set(self.forwarded) - active
        replies = send(
            [
                stage_message(
                    node,
                    self.rnd,
                    UNMASK,
                    {
                        "active": [v for v in self.neighbours[node] if v in active],
                        "dropped": [v for v in self.neighbours[node] if v in dropped],
                    },
                )
                for node in sorted(active)
            ]
        )
        shares: dict[int, list[bytes]] = defaultdict(list)
        for reply in replies.values():
            body = _body(reply)
            for owner, share in zip(body["owners"], body["shares"], strict=True):
                shares[int(owner)].append(share)
        if any(len(shares[node]) < self.threshold for node in active | dropped):
            return None

        vectors = list(masked.values())
        total = vectors[0]
        for vector in vectors[1:]:
            total = parameters_mod(parameters_addition(total, vector), MODULUS)
        shapes = _shapes(total)
        for node in sorted(active):
            self_mask = pseudo_rand_gen(combine_shares(shares[node]), MODULUS, shapes)
            total = parameters_subtraction(total, self_mask)
        for node in sorted(dropped):
            mask_key = combine_shares(shares[node])
            for peer in self.neighbours[node]:
                if peer not in active:
                    continue
                pair = pseudo_rand_gen(_agree(mask_key, self.public[peer][0]), MODULUS, shapes)
                # The survivor added the pair mask if its id is the larger one.
                total = (parameters_subtraction if peer > node else parameters_addition)(
                    total, pair
                )
        total = parameters_mod(total, MODULUS)
        summed = dequantize(total[:-1], clip, self.levels)
        offset = (len(active) - 1) * clip  # each term was shifted by +clip to quantize
        return [v - offset for v in summed] + [total[-1].astype(np.float64)]


def share_keys(
    rnd: int,
    nodes: Sequence[int],
    neighbours: int,
    threshold: float,
    send: Send,
    rng: np.random.Generator,
) -> SecAggRound:
    """Stages ``keys`` and ``shares`` with the sampled ``nodes``; the nodes that finished
    both are the round's participants (``SecAggRound.forwarded``)."""
    graph = neighbour_graph(nodes, neighbours, rng)
    shares = len(graph[nodes[0]])  # every node has as many peers (itself included)
    state = SecAggRound(rnd, threshold_for(shares, threshold), graph)
    replies = send(
        [stage_message(n, rnd, KEYS, {"threshold": state.threshold}) for n in sorted(nodes)]
    )
    for node, reply in replies.items():
        body = _body(reply)
        state.public[node] = (body["pk-mask"], body["pk-channel"])

    def peers_of(node: int) -> list[int]:
        return [v for v in graph[node] if v in state.public]

    replies = send(
        [
            stage_message(
                node,
                rnd,
                SHARES,
                {
                    "peers": peers_of(node),
                    "pk-mask": [state.public[v][0] for v in peers_of(node)],
                    "pk-channel": [state.public[v][1] for v in peers_of(node)],
                },
            )
            for node in sorted(state.public)
        ]
    )
    state.forwarded = {node: [] for node in sorted(replies)}
    for src in sorted(replies):
        body = _body(replies[src])
        for dst, ciphertext in zip(body["destinations"], body["ciphertexts"], strict=True):
            if dst in state.forwarded:
                state.forwarded[int(dst)].append((src, ciphertext))
    return state


def masked_vectors(content: RecordDict, arrays_key: str, metrics_key: str) -> Vectors:
    """A masked reply's vectors as integers: the arrays by sorted key, then the count."""
    record = content.array_records[arrays_key]
    vectors = [record[k].numpy().astype(np.int64) for k in sorted(record)]
    count = int(content.metric_records[metrics_key][COUNT_KEY])  # type: ignore[arg-type]
    return [*vectors, np.array([count], dtype=np.int64)]


# ------------------------------------------------------------------------ client side


def handle_stage(message: Message, context: Context) -> Message:
    """The client's side of stages ``keys``, ``shares`` and ``unmask``."""
    request = _body(message)
    stage, rnd = str(request["stage"]), int(request[ROUND_KEY])
    node = message.metadata.dst_node_id
    if stage == KEYS:
        state, reply = _keys(rnd, int(request["threshold"]))
    else:
        state = _state(context, rnd, stage)
        if stage == SHARES:
            reply = _shares(state, node, request)
        elif stage == UNMASK:
            reply = _unmask(state, request)
        else:
            raise ValueError(f"unknown secure-aggregation stage {stage!r}")
    if stage == UNMASK:  # the round is over: forget its secrets
        del context.state.config_records[STATE]
    else:
        context.state.config_records[STATE] = ConfigRecord(state)
    return Message(RecordDict({RECORD: ConfigRecord(reply)}), reply_to=message)


def _state(context: Context, rnd: int, stage: str) -> dict[str, Any]:
    if STATE not in context.state.config_records:
        raise ValueError(f"secure aggregation: stage {stage!r} of round {rnd} before 'keys'")
    state = dict(context.state.config_records[STATE])
    if state[ROUND_KEY] != rnd:
        raise ValueError(
            f"secure aggregation: stage {stage!r} of round {rnd}, keys of {state[ROUND_KEY]!r}"
        )
    return state


def _keys(rnd: int, threshold: int) -> tuple[dict[str, Any], dict[str, Any]]:
    mask_private, mask_public = generate_key_pairs()
    channel_private, channel_public = generate_key_pairs()
    state = {
        ROUND_KEY: rnd,
        "threshold": threshold,
        "sk-mask": private_key_to_bytes(mask_private),
        "sk-channel": private_key_to_bytes(channel_private),
    }
    reply = {
        "pk-mask": public_key_to_bytes(mask_public),
        "pk-channel": public_key_to_bytes(channel_public),
    }
    return state, reply


def _shares(state: dict[str, Any], node: int, request: dict[str, Any]) -> dict[str, Any]:
    peers = [int(v) for v in request["peers"]]
    pk_mask, pk_channel = list(request["pk-mask"]), list(request["pk-channel"])
    if node not in peers or len(peers) < state["threshold"]:
        raise ValueError(f"secure aggregation: {len(peers)} peers, threshold {state['threshold']}")
    if len(set(pk_mask + pk_channel)) != 2 * len(peers):
        raise ValueError("secure aggregation: public keys repeat")
    seed = os.urandom(32)
    seed_shares = create_shares(seed, state["threshold"], len(peers))
    key_shares = create_shares(state["sk-mask"], state["threshold"], len(peers))
    destinations, ciphertexts = [], []
    for peer, channel, seed_share, key_share in zip(
        peers, pk_channel, seed_shares, key_shares, strict=True
    ):
        if peer == node:
            state.update({"owners": [node], "seed-shares": [seed_share], "key-shares": [key_share]})
            continue
        plaintext = share_keys_plaintext_concat(node, peer, seed_share, key_share)
        destinations.append(peer)
        ciphertexts.append(encrypt(_agree(state["sk-channel"], channel), plaintext))
    state.update({"seed": seed, "peers": peers, "pk-mask": pk_mask, "pk-channel": pk_channel})
    return {"destinations": destinations, "ciphertexts": ciphertexts}


def mask_update(context: Context, message: Message, vectors: Vectors, count: int) -> Vectors:
    """Step 3 on the client: keep the shares the train ``message`` brought, mask
    ``vectors`` (floats within its ``range``) and ``count``; the masked vectors, count last."""
    record, node = _body(message), message.metadata.dst_node_id
    rnd = int(record[ROUND_KEY])
    state = _state(context, rnd, "train")
    peers = state["peers"]
    sources = [int(s) for s in record["sources"]]
    if len(sources) + 1 < state["threshold"]:
        raise ValueError(f"secure aggregation: {len(sources) + 1} participants < threshold")
    for src, ciphertext in zip(sources, record["ciphertexts"], strict=True):
        channel = _agree(state["sk-channel"], state["pk-channel"][peers.index(src)])
        sender, receiver, seed_share, key_share = share_keys_plaintext_separate(
            decrypt(channel, ciphertext)
        )
        if (sender, receiver) != (src, node):
            raise ValueError(
                f"secure aggregation: a share from {sender} to {receiver} reached {node}"
            )
        state["owners"] = [*state["owners"], src]
        state["seed-shares"] = [*state["seed-shares"], seed_share]
        state["key-shares"] = [*state["key-shares"], key_share]
    levels, bound = int(record["levels"]), float(record["range"])
    plain = quantize(vectors, bound, levels) + [np.array([count], dtype=np.int64)]
    shapes = _shapes(plain)
    masked = parameters_addition(plain, pseudo_rand_gen(state["seed"], MODULUS, shapes))
    for src in sources:
        pair = pseudo_rand_gen(
            _agree(state["sk-mask"], state["pk-mask"][peers.index(src)]), MODULUS, shapes
        )
        masked = (parameters_addition if node > src else parameters_subtraction)(masked, pair)
    context.state.config_records[STATE] = ConfigRecord(state)
    return parameters_mod(masked, MODULUS)


def _unmask(state: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    active = [int(v) for v in request["active"]]
    dropped = [int(v) for v in request["dropped"]]
    if set(active) & set(dropped):
        raise ValueError("secure aggregation: a node is both active and dropped")
    if len(active) < state["threshold"]:
        raise ValueError(f"secure aggregation: {len(active)} survivors < threshold")
    held = dict(
        zip(
            state["owners"],
            zip(state["seed-shares"], state["key-shares"], strict=True),
            strict=True,
        )
    )
    owners = [v for v in active + dropped if v in held]
    shares = [held[v][0] for v in active if v in held] + [held[v][1] for v in dropped if v in held]
    return {"owners": owners, "shares": shares}
