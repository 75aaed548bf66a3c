"""One round's named steps: assign -> send -> judge -> record.

:class:`Federation` holds what a run fixes before round 1 (the strategy and its traits,
the grid of known clients, the fleet, the seed-step bookkeeping, the validation
bounds); :class:`RunState` (in :mod:`fedtune.server.loop`) holds what changes. The
loop in :func:`fedtune.server.loop.run_federation` calls, each round:

1. the strategy's ``configure_train`` (it samples; Flower's API),
2. :func:`assign` — each sampled message becomes an :class:`Assignment` (client, engine,
   LoRA rank, instructions) and the message that client gets, built once;
3. :func:`send` — the devices that cannot hold the training are not sent work, the
   rest are sent and waited for until the deadline;
4. :func:`judge` — each reply is validated against what its client was sent; the round
   policy (dropouts, stragglers, surplus) decides which count;
5. :func:`record` — ``client_update`` events, and the accepted replies for the
   strategy's ``aggregate_train``.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp.strategy import Strategy

from fedtune.config import Scenario
from fedtune.metrics import EventLog
from fedtune.models.lora import AdapterState
from fedtune.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    DECLINED_REPLY_CODE,
    MAX_UPDATE_FACTOR,
    METRICS_KEY,
    ROUND_KEY,
    SECAGG_RECORD,
    WEIGHT_KEY,
    StrategyTraits,
    TrainInstructions,
    report_fields,
    reported,
)
from fedtune.server.fleet import Fleet, keep_first_arrivals
from fedtune.server.grid import DeviceGrid
from fedtune.server.seed_sync import SeedSync
from fedtune.wire import (
    ArraySpec,
    check_update,
    client_error,
    expected_specs,
    from_record,
    recorddict_nbytes,
    to_record,
)

if TYPE_CHECKING:
    from fedtune.strategies.private import PrivateAggregation


@dataclass
class Federation:
    """What a run fixes before its first round."""

    scenario: Scenario
    strategy: Strategy
    """The strategy the loop calls (wrapped for privacy when ``[privacy]`` asks)."""
    traits: StrategyTraits
    grid: DeviceGrid
    fleet: Fleet | None
    seeds: SeedSync
    attackers: frozenset[int]
    specs: dict[str, ArraySpec]
    """Shapes of the global adapter (rank ``lora.r``)."""
    max_bytes: int
    """The largest update accepted: :data:`~fedtune.protocol.MAX_UPDATE_FACTOR` x fp32."""
    mixed: dict[str, int] = field(default_factory=dict)
    """Device tiers whose LoRA rank differs from ``lora.r``."""
    private: PrivateAggregation | None = None
    """The privacy wrapper when :attr:`strategy` is one (it adds round fields)."""

    @property
    def global_rank(self) -> int:
        return self.scenario.lora.r

    def engine_for(self, client: int) -> str:
        """The engine ``client`` trains with (per tier under ``client.engine = "auto"``)."""
        engine = self.scenario.client.engine
        if engine == "auto" and self.fleet is not None:
            return self.fleet.engine_for(client, self.scenario.client.auto_fallback)
        return engine

    def rank_for(self, client: int) -> int:
        if not self.mixed or self.fleet is None:
            return self.global_rank
        return self.fleet.rank_of(client, self.global_rank)

    def specs_for(self, rank: int, adapter: AdapterState) -> dict[str, ArraySpec]:
        """What a reply of a client of ``rank`` must look like."""
        if rank == self.global_rank:
            return self.specs
        from fedtune.strategies.lora_math import truncate

        return expected_specs(truncate(adapter, rank))


def max_update_bytes(adapter: AdapterState) -> int:
    return MAX_UPDATE_FACTOR * sum(v.numel() * 4 for v in adapter.values())


@dataclass(frozen=True)
class Assignment:
    """One sampled client's part of a round."""

    client: int
    node: int
    engine: str
    rank: int
    asked: TrainInstructions
    message: Message
    """The message as sent (its content is this client's own)."""
    bytes_down: int


@dataclass
class Judged:
    """A sampled client's outcome: its ``client_update`` event, the reply, the decoded
    update (None unless accepted)."""

    event: dict[str, Any]
    reply: Message | None = None
    update: AdapterState | None = None
    assignment: Assignment | None = None

    def reject(self, reason: str) -> None:
        self.event.update(status="rejected", reason=reason)
        self.update = None

    def as_tuple(self) -> tuple[dict[str, Any], Message | None, AdapterState | None]:
        return self.event, self.reply, self.update


@dataclass
class Tally:
    """What one round's replies came to."""

    accepted: list[tuple[int, Message]] = field(default_factory=list)
    rejected: int = 0
    dropped: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def train_loss(self) -> float | None:
        return sum(self.losses) / len(self.losses) if self.losses else None


@contextlib.contextmanager
def seeded_global_random(seed: int, rnd: int) -> Iterator[None]:
    """Seed Python's ``random`` for one ``configure_train`` call, then restore it.

    Flower's strategies sample nodes with the global ``random`` module; seeding it
    here (and listing nodes in client order, see DeviceGrid) makes sampling a
    function of (seed, round) for every Flower strategy, built-in or plug-in.
    """
    saved = random.getstate()
    random.seed(int(np.random.SeedSequence([seed, rnd, 0x5A]).generate_state(1)[0]))
    try:
        yield
    finally:
        random.setstate(saved)


def sample(fed: Federation, rnd: int, adapter: AdapterState, spec: dict[str, Any]) -> list[Message]:
    """The strategy's ``configure_train``: which nodes train, and its messages."""
    if fed.fleet is not None:
        fed.grid.available = fed.fleet.available_nodes(fed.grid, rnd, fed.scenario.round.sampled)
    config = TrainInstructions(round=rnd, spec=spec).to_config()
    with seeded_global_random(fed.scenario.run.seed, rnd):
        return list(fed.strategy.configure_train(rnd, to_record(adapter), config, fed.grid))


def assign(
    fed: Federation, rnd: int, sampled: list[Message], adapter: AdapterState
) -> list[Assignment]:
    """Each sampled message as its client gets it: the strategy's records, with the
    client's instructions — engine, LoRA rank, the factors the strategy's traits name,
    and for seed-step strategies the adapter version (or catch-up steps in place of
    the adapter)."""
    traits = fed.traits
    history = fed.strategy.seed_history if traits.seed_steps else None  # type: ignore[attr-defined]
    assignments = []
    for message in sampled:
        node = message.metadata.dst_node_id
        client = fed.grid.client_index(node)
        engine, rank = fed.engine_for(client), fed.rank_for(client)
        content = RecordDict(dict(message.content.items()))  # the strategy's share one
        if rank != fed.global_rank:  # a tier of its own rank: the strategy's download
            content[ARRAYS_KEY] = fed.strategy.download(content[ARRAYS_KEY], rank)  # type: ignore[attr-defined]
        asked = with_traits(TrainInstructions.of(message), traits).but(
            round=rnd, engine=engine, rank=0 if rank == fed.global_rank else rank
        )
        if engine != "forward":  # probes are the forward engine's (tiers under "auto")
            asked = asked.but(probes=0, guide_sigmas=0.0)
        elif fed.scenario.client.engine == "auto" and not asked.probes:
            # client.auto_fallback = "forward" beside backprop: FwdLLM's probes at the
            # adapter sent, uniform directions (no strategy keeps a guide to sample by).
            asked = asked.but(probes=fed.scenario.client.perturbations, guide_sigmas=0.0)
        if asked.uploads_seeds and history is not None:
            asked = fed.seeds.offer(asked, content, client, adapter, history)
        sent = addressed(message, asked, content)
        assignments.append(
            Assignment(client, node, engine, rank, asked, sent, recorddict_nbytes(sent.content))
        )
    return assignments


def more_assignments(
    fed: Federation,
    rnd: int,
    wave: int,
    template: Message,
    asked: set[int],
    count: int,
    adapter: AdapterState,
) -> list[Assignment]:
    """A paced strategy's extra wave: up to ``count`` more clients for round ``rnd``,
    drawn (seeded by run, round and wave) from the available nodes not yet ``asked``,
    each sent the round's message (``template``, one the strategy built). Nodes are
    taken in client order (the grid's), so the same seed asks the same clients."""
    nodes = [n for n in fed.grid.get_node_ids() if n not in asked]
    seed = np.random.SeedSequence([fed.scenario.run.seed, rnd, wave, 0x9A]).generate_state(1)
    chosen = random.Random(int(seed[0])).sample(nodes, min(count, len(nodes)))
    messages = [
        Message(
            content=template.content,
            message_type=template.metadata.message_type,
            dst_node_id=node,
            group_id=template.metadata.group_id,
        )
        for node in chosen
    ]
    return assign(fed, rnd, messages, adapter)


def with_traits(asked: TrainInstructions, traits: StrategyTraits) -> TrainInstructions:
    """What a strategy's declared traits ask of every client it samples."""
    return asked.but(train_only=traits.trains, fresh=traits.fresh_adapter, local=traits.keeps_local)


def addressed(
    message: Message, asked: TrainInstructions, content: RecordDict | None = None
) -> Message:
    """A message to ``message``'s node with ``content`` (default: a copy of its records;
    a strategy's messages share one) and ``asked`` as its train config."""
    content = content if content is not None else RecordDict(dict(message.content.items()))
    content[CONFIG_KEY] = asked.to_config()
    return Message(
        content=content,
        message_type=message.metadata.message_type,
        dst_node_id=message.metadata.dst_node_id,
        group_id=message.metadata.group_id,
    )


def new_event(fed: Federation, rnd: int, a: Assignment, bytes_down: int) -> dict[str, Any]:
    """The fields every ``client_update`` event of an assignment has."""
    return {
        "round": rnd,
        "node": a.node,
        "client": a.client,
        "engine": a.engine,
        "bytes_down": bytes_down,
        **({"attacker": a.client in fed.attackers} if fed.attackers else {}),
        **({"lora_rank": a.rank} if fed.mixed else {}),
    }


def send(
    fed: Federation, rnd: int, assignments: list[Assignment], wait: float | None = None
) -> tuple[list[tuple[Assignment, Message | None]], list[Judged], float]:
    """Send the assignments whose devices can hold the training; wait for replies (at
    most ``wait`` seconds; default: the round's deadline, or its timeout on a fleet).

    Returns (assignment, reply or None) for those sent, the judged events of those not
    sent (``dropped``: does not fit), and how long the loop waited.
    """
    scenario = fed.scenario
    if wait is None:
        wait = scenario.round.timeout_s if fed.fleet is not None else scenario.round.deadline_s
    unsent: list[Judged] = []
    if fed.fleet is not None:  # a device whose memory cannot hold the training gets no work
        by_message = {id(a.message): a for a in assignments}
        kept, unfit = fed.fleet.split_unfit(
            [a.message for a in assignments],
            fed.grid,
            lambda m: by_message[id(m)].engine,
        )
        for message, reason in unfit:
            event = new_event(fed, rnd, by_message[id(message)], 0)
            event.update(bytes_up=0, status="dropped", reason=reason)
            unsent.append(Judged(event))
        assignments = [by_message[id(m)] for m in kept]
    replies = fed.grid.collect([a.message for a in assignments], wait)
    return list(zip(assignments, replies, strict=True)), unsent, wait


def judge(
    fed: Federation,
    rnd: int,
    assignment: Assignment,
    reply: Message | None,
    adapter: AdapterState,
    wait: float,
) -> Judged:
    """Validate one reply against what its client was sent.

    Seed steps are replayed on the adapter sent, so strategies always receive adapters.
    A reply for another round, an error reply or a malformed update is ``rejected`` with
    the reason; no reply is ``dropped``. A phone's bytes are what the gateway served and
    received for its task (artifacts included), not the size of the Flower records.
    """
    judged = _judge(fed, rnd, assignment, reply, adapter, wait)
    if assignment.node in fed.grid.arrival:  # sending to reply, as the server saw it
        judged.event["reply_seconds"] = fed.grid.arrival[assignment.node]
    measured = fed.grid.measured_transfer(assignment.node)
    if measured is not None:
        judged.event["bytes_down"], judged.event["bytes_up"] = measured
    return judged


def _judge(
    fed: Federation,
    rnd: int,
    assignment: Assignment,
    reply: Message | None,
    adapter: AdapterState,
    wait: float,
) -> Judged:
    event = new_event(fed, rnd, assignment, assignment.bytes_down)
    if reply is None:
        event.update(status="dropped", reason=f"no reply within {wait} s", bytes_up=0)
        return Judged(event, assignment=assignment)
    if reply.has_error() and reply.error.code == DECLINED_REPLY_CODE:
        event.update(status="dropped", reason=client_error(reply), bytes_up=0)
        return Judged(event, reply, assignment=assignment)
    event["bytes_up"] = recorddict_nbytes(reply.content) if not reply.has_error() else 0
    event.update(report_fields(reply))
    update: AdapterState | None
    if assignment.asked.uploads_seeds:
        update, steps, reason = fed.seeds.receive(
            assignment.asked, reply, assignment.client, sent_adapter(assignment, adapter)
        )
        if update is not None and steps is not None:
            fed.seeds.for_strategy(reply, steps, keep=fed.traits.seed_steps)
    else:
        expected = fed.specs_for(assignment.rank, adapter)
        update, reason = check_update(
            reply, expected, fed.max_bytes, fed.scenario.client.wire_dtype
        )
    if update is not None and reported(reply, ROUND_KEY) != rnd:
        update, reason = None, f"stale round {reported(reply, ROUND_KEY)!r} (now {rnd})"
    if update is None:
        event.update(status="rejected", reason=reason)
        return Judged(event, reply, None, assignment)
    # The aggregation weight is what the server asked for, never the client's claim.
    event["reported_num_examples"] = event["num_examples"]
    event["num_examples"] = assignment.asked.examples
    reply.content.metric_records[METRICS_KEY][WEIGHT_KEY] = assignment.asked.examples
    event["status"] = "ok"
    return Judged(event, reply, update, assignment)


def sent_adapter(assignment: Assignment, adapter: AdapterState) -> AdapterState:
    """The adapter a client was sent: its message's (a tier's own rank, say), or the
    global adapter where catch-up steps went instead."""
    content = assignment.message.content
    if ARRAYS_KEY in content.array_records:
        return from_record(content.array_records[ARRAYS_KEY])
    return adapter


def update_norms(judged: list[Judged], adapter: AdapterState) -> dict[int, float]:
    """The L2 norm of each accepted update's change of the adapter its client was sent
    (the global adapter where catch-up steps went instead), by position in ``judged``."""
    norms = {}
    for i, j in enumerate(judged):
        if j.event["status"] != "ok" or j.update is None or j.assignment is None:
            continue
        if SECAGG_RECORD in j.assignment.message.content.config_records:
            continue  # masked values in Z_M, not an update: clients clipped it themselves
        sent = sent_adapter(j.assignment, adapter)
        squares = sum(
            float(((j.update[k].double() - sent[k].double()) ** 2).sum())
            for k in j.update
            if k in sent and sent[k].shape == j.update[k].shape
        )
        norms[i] = math.sqrt(squares)
    return norms


def bound_updates(fed: Federation, judged: list[Judged], adapter: AdapterState) -> None:
    """The round's update-norm bound, in place: updates far larger than the adapter or
    than the cohort's median are rejected with the reason; with ``round.clip_updates``,
    the rest are scaled down to that multiple of the median."""
    settings = fed.scenario.round
    norms = update_norms(judged, adapter)
    if settings.max_update_ratio:
        size = math.sqrt(sum(float((v.double() ** 2).sum()) for v in adapter.values()))
        bound = settings.max_update_ratio * max(size, 1e-12)
        for i, norm in list(norms.items()):
            if not norm <= bound:  # also catches an overflow to inf
                judged[i].reject(
                    f"update norm {norm:.3g} exceeds round.max_update_ratio = "
                    f"{settings.max_update_ratio:g} x the adapter's norm {size:.3g}"
                )
                del norms[i]
    if len(norms) < 3 or not (settings.outlier_factor or settings.clip_updates):
        return
    median = statistics.median(norms.values())
    for i, norm in norms.items():
        if settings.outlier_factor and norm > settings.outlier_factor * median:
            judged[i].reject(
                f"update norm {norm:.3g} exceeds round.outlier_factor = "
                f"{settings.outlier_factor:g} x the round's median {median:.3g}"
            )
        elif settings.clip_updates and norm > settings.clip_updates * median > 0:
            j = judged[i]
            assert j.update is not None and j.assignment is not None
            sent = sent_adapter(j.assignment, adapter)
            scale = settings.clip_updates * median / norm
            j.update = {k: sent[k] + scale * (v - sent[k]) for k, v in j.update.items()}
            j.event["clipped_from_norm"] = norm


def answered(judged: list[Judged]) -> dict[int, bool]:
    """Each node sent work this round -> whether it replied at all (a reply that is
    rejected is still an answer; only silence counts toward ``round.max_missed``)."""
    return {j.assignment.node: j.reply is not None for j in judged if j.assignment is not None}


def apply_round_policy(fed: Federation, rnd: int, judged: list[Judged], extra: int = 0) -> None:
    """Device dropouts, then stragglers past the deadline and surplus over-selected
    reports, on simulated time (or on arrival time), in place. ``extra``: clients a
    paced strategy added to the round, kept on top of ``round.clients_per_round``."""
    tuples = [j.as_tuple() for j in judged]
    keep = fed.scenario.round.clients_per_round + extra
    if fed.fleet is not None:
        fed.fleet.apply(tuples, fed.scenario, rnd, keep)
    else:
        keep_first_arrivals(tuples, fed.grid.arrival, keep)


def record(
    fed: Federation,
    rnd: int,
    judged: list[Judged],
    events: EventLog,
    on_event: Any,
    save_update: Any = None,
) -> Tally:
    """Write each client's event; collect the accepted replies (carrying the decoded
    fp32 update, which is what strategies aggregate)."""
    tally = Tally()
    for j in judged:
        event = j.event
        tally.bytes_down += event["bytes_down"]
        tally.bytes_up += event["bytes_up"]
        if event["status"] == "ok" and j.reply is not None and j.update is not None:
            j.reply.content[ARRAYS_KEY] = to_record(j.update)
            tally.accepted.append((event["client"], j.reply))
            tally.losses.append(float(event["loss"]))
            if save_update is not None:
                save_update(rnd, event["client"], j.update, event["num_examples"])
        elif event["status"] == "rejected":
            tally.rejected += 1
        else:
            tally.dropped += 1
        events.write("client_update", **event)
        on_event(rnd, event)
    return tally


def aggregate_in_client_order(strategy: Any, rnd: int, accepted: list[tuple[int, Message]]) -> Any:
    """``strategy.aggregate_train`` over replies sorted by client index: its arrays.

    Floating-point sums depend on their order; sorting makes the aggregate independent
    of the order in which replies arrived.
    """
    return aggregate_with_metrics(strategy, rnd, accepted)[0]


def aggregate_with_metrics(
    strategy: Any, rnd: int, accepted: list[tuple[int, Message]]
) -> tuple[Any, dict[str, Any]]:
    """:func:`aggregate_in_client_order`'s arrays and the strategy's MetricRecord as a
    plain dict (empty when it returns none)."""
    ordered = [message for _, message in sorted(accepted, key=lambda pair: pair[0])]
    _common_metrics(ordered)
    arrays, metrics = strategy.aggregate_train(rnd, ordered)
    return arrays, dict(metrics) if metrics is not None else {}


def _common_metrics(replies: list[Message]) -> None:
    """Keep in each reply's metrics only the keys every reply has, in place: Flower's
    strategies refuse a round whose MetricRecords differ, and engines report different
    ones (``client.engine = "auto"`` mixes backprop with probes). Each client's full
    report is in its ``client_update`` event already."""
    found = [r.content.metric_records.get(METRICS_KEY) for r in replies]
    records = [record for record in found if record is not None]
    if len(records) < 2 or len(records) != len(found):
        return
    common = set.intersection(*(set(record.keys()) for record in records))
    for record in records:
        for key in set(record.keys()) - common:
            del record[key]
