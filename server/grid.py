"""DeviceGrid: Flower's Grid with known clients, a stable node order, and deadlines.

Flower gives nodes random ids, so "the same seed samples the same clients" needs a
map from node to client. At start the grid asks every node (a ``query`` message)
which client it is (its ``partition-id``), and from then on lists node ids in client
order. Strategies sample from that list as from any Flower grid.

Fleets churn, so :meth:`DeviceGrid.refresh` re-lists the nodes before each round
(:class:`NodeChanges`): a node no longer listed (Flower drops a SuperNode whose
heartbeats stopped) is not sampled; a newly listed node is asked which client it is and
joins; a node that left ``round.max_missed`` consecutive messages unanswered is benched
(not sampled) until it answers again; and a partition belongs to the node that claimed
it last, so a restarted SuperNode or phone, which comes back under a new node id,
reclaims its own partition from the node id it had (``docs/deploy.md``, "Nodes that
come and go").

:meth:`DeviceGrid.collect` replaces ``send_and_receive`` in the round loop: it
reports each reply as it arrives and stops at the deadline, so a node that vanishes
is a timeout, not a crash.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedtune.errors import RunInterrupted
from fedtune.protocol import CLIENT_INDEX_KEY, INFO_KEY

POLL_SECONDS = 0.05


@dataclass(frozen=True)
class NodeInfo:
    """What a node told the server about itself."""

    node_id: int
    client_index: int


@dataclass
class NodeChanges:
    """How the grid's nodes changed since the last round: what a ``nodes`` event says."""

    joined: list[tuple[int, int]] = field(default_factory=list)
    """(node, client) of nodes that joined."""
    reclaimed: list[tuple[int, int, int]] = field(default_factory=list)
    """(client, node that held it, node that took it over)."""
    gone: list[int] = field(default_factory=list)
    """Nodes no longer listed."""
    benched: list[int] = field(default_factory=list)
    """Nodes that left ``round.max_missed`` messages in a row unanswered."""
    back: list[int] = field(default_factory=list)
    """Benched nodes that answered again."""

    def __bool__(self) -> bool:
        return any((self.joined, self.reclaimed, self.gone, self.benched, self.back))

    def fields(self) -> dict[str, Any]:
        return {
            "joined": [{"node": n, "client": c} for n, c in self.joined],
            "reclaimed": [{"client": c, "from": a, "to": b} for c, a, b in self.reclaimed],
            "gone": list(self.gone),
            "benched": list(self.benched),
            "back": list(self.back),
        }


class WrappedGrid(Grid):
    """A :class:`flwr.serverapp.Grid` around another: run and message creation are the
    inner grid's; subclasses decide which nodes exist and how messages travel."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def pull_replies(self, message_ids: Iterable[str]) -> list[tuple[str, Message]]:
        """Replies that arrived, each paired with the id of the message it answers."""
        return replies_of(self._grid, message_ids)


class StoppableGrid(WrappedGrid):
    """A grid that raises :class:`~fedtune.errors.RunInterrupted` at its next call once
    ``stop`` is set: the loop, which polls its grid while it waits for replies or nodes,
    ends within a poll, and the last checkpoint is what a resume starts from."""

    def __init__(self, grid: Grid, stop: threading.Event) -> None:
        super().__init__(grid)
        self.stop = stop

    def _go_on(self) -> None:
        if self.stop.is_set():
            raise RunInterrupted("the run was asked to stop")

    def get_node_ids(self) -> Iterable[int]:
        self._go_on()
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._go_on()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._go_on()
        return self._grid.pull_messages(message_ids)

    def pull_replies(self, message_ids: Iterable[str]) -> list[tuple[str, Message]]:
        self._go_on()
        return replies_of(self._grid, message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        self._go_on()
        return self._grid.send_and_receive(messages, timeout=timeout)


def replies_of(grid: Grid, message_ids: Iterable[str]) -> list[tuple[str, Message]]:
    """``grid``'s replies to ``message_ids``, each with the id it answers: a fedtune
    grid pairs them itself (phones' replies carry no Flower message id); a Flower grid's
    replies name it in their metadata."""
    if isinstance(grid, WrappedGrid):
        return grid.pull_replies(message_ids)
    return [(r.metadata.reply_to_message_id, r) for r in grid.pull_messages(message_ids)]


class DeviceGrid(WrappedGrid):
    """A :class:`flwr.serverapp.Grid` wrapper whose nodes are known clients.

    ``known`` maps node ids to client indices the server can trust without asking (the
    simulation engine's own virtual nodes, :func:`fedtune.simulations.runner.simulate`):
    those nodes are never sent a discovery query, so discovery costs nothing per node of
    a population that is never sampled.
    """

    def __init__(self, grid: Grid, known: Mapping[int, int] | None = None) -> None:
        super().__init__(grid)
        self.nodes: dict[int, NodeInfo] = {}
        """Live nodes: listed by the grid, not benched."""
        self.available: set[int] | None = None
        """Nodes eligible this round (None: all); set by the loop from device tiers."""
        self.arrival: dict[int, float] = {}
        """Seconds from sending to each reply, by source node (the last ``collect``)."""
        self.message_ids: dict[int, str] = {}
        """The id of the last message each node was sent."""
        self.known: Mapping[int, int] = known if known is not None else {}
        self._trusts = known is not None
        self.population = 0
        self.clients: dict[int, int] = {}
        """Every node ever admitted -> its client (events of a node that has left)."""
        self.benched: dict[int, NodeInfo] = {}
        self.left: dict[int, NodeInfo] = {}
        """Nodes no longer listed, by node: what a short round falls back on."""
        self.misses: dict[int, int] = {}
        """Node -> messages in a row it left unanswered."""
        self.probes: dict[str, int] = {}
        """Discovery queries not answered yet: message id -> node."""
        self.filled: list[int] = []
        """Nodes that are not live, listed this round only because too few are."""
        self._changes = NodeChanges()

    def get_node_ids(self) -> Iterable[int]:
        """Known (and, if set, available) nodes, in client order: stable across runs."""
        nodes = sorted(self.nodes.values(), key=lambda n: n.client_index)
        listed = [n.node_id for n in nodes if self.available is None or n.node_id in self.available]
        return listed + self.filled

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        self.message_ids.update(
            (m.metadata.dst_node_id, mid) for m, mid in zip(messages, ids, strict=True)
        )
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)

    # -- fedtune additions -------------------------------------------------------
    def client_index(self, node_id: int) -> int:
        info = self.nodes.get(node_id)
        return info.client_index if info is not None else self.clients[node_id]

    def is_phone(self, node_id: int) -> bool:
        """Whether the node is a phone of the device gateway (not a Flower node)."""
        inner = self._grid
        return isinstance(inner, GatewayGrid) and inner.gateway.owns_node(node_id)

    def measured_transfer(self, node_id: int) -> tuple[int, int] | None:
        """(bytes down, bytes up) a phone moved for the last message sent to it, as the
        device gateway counted them; None for a Flower node (its records are measured)."""
        message_id = self.message_ids.get(node_id)
        if message_id and self.is_phone(node_id):
            assert isinstance(self._grid, GatewayGrid)
            return self._grid.gateway.transfer(message_id)
        return None

    def discover(self, expected: int, population: int, timeout: float) -> dict[int, NodeInfo]:
        """Wait for ``expected`` nodes, ask each which client it is, keep the valid ones.

        A node whose client index is outside ``[0, population)`` or duplicates another
        node's is left out with a logged reason. Nodes in ``known`` are not asked.
        """
        self.population = population
        deadline = time.monotonic() + timeout
        while len(ids := list(self._grid.get_node_ids())) < expected:
            if time.monotonic() > deadline:
                log(
                    WARNING, "Only %d of %d nodes connected; going on with them", len(ids), expected
                )
                break
            time.sleep(0.2)
        while self._trusts and not all(n in self.known for n in ids):
            if time.monotonic() > deadline:  # the engine's map never came: ask the nodes
                break
            time.sleep(POLL_SECONDS)
        found: dict[int, NodeInfo] = {}
        taken: set[int] = set()
        for node, index in self._ask(sorted(ids), max(deadline - time.monotonic(), 5.0)):
            if index in taken:
                log(WARNING, "Node %d claims client %d, which another has; left out", node, index)
                continue
            taken.add(index)
            found[node] = NodeInfo(node, index)
        self.nodes = found
        self.clients.update((n, i.client_index) for n, i in found.items())
        log(INFO, "Discovered %d client nodes", len(found))
        return found

    def refresh(self, max_missed: int, wait: float, needed: int) -> NodeChanges:
        """Re-list the nodes before a round; return what changed since the last round.

        Nodes no longer listed leave; newly listed ones are asked which client they are
        (for up to ``wait`` seconds; a later answer counts at a later round); benched
        nodes are asked again and come back when they answer. A claim of a partition
        another node holds moves the partition to the claimant: the latest claim wins.
        With fewer than ``needed`` live nodes, nodes that left or are benched fill the
        list (in client order; logged): Flower's strategies wait for ever for more nodes
        than a grid lists, and a missing reply is only a dropped update.
        """
        changes, self._changes = self._changes, NodeChanges()
        listed = set(self._grid.get_node_ids())
        for node in sorted(set(self.nodes) - listed):
            self.left[node] = self.nodes.pop(node)
            changes.gone.append(node)
        for node in sorted(set(self.benched) - listed):
            self.left[node] = self.benched.pop(node)
        asking = set(self.probes.values())
        new = sorted(n for n in listed if n not in self.nodes and n not in asking)
        again = [n for n in new if n in self.benched]  # asked, not waited for
        claims = self._ask(again, 0.0, keep_unanswered=True)
        claims += self._ask([n for n in new if n not in self.benched], wait, keep_unanswered=True)
        for node, index in claims:
            self._admit(node, index, changes)
        self.filled = []
        if len(self.nodes) < needed:
            held = {info.client_index for info in self.nodes.values()}
            spare = sorted(
                {**self.left, **self.benched}.values(), key=lambda info: info.client_index
            )
            for info in spare:
                if len(self.nodes) + len(self.filled) >= needed:
                    break
                if info.client_index not in held:
                    held.add(info.client_index)
                    self.filled.append(info.node_id)
            log(
                WARNING,
                "%d live client nodes, a round samples %d: %d that left or are benched are "
                "sampled too",
                len(self.nodes),
                needed,
                len(self.filled),
            )
        if changes:
            log(INFO, "Nodes changed: %s (%d live)", changes.fields(), len(self.nodes))
        return changes

    def note_answers(self, answered: Mapping[int, bool], max_missed: int) -> None:
        """After a round: ``answered[node]`` says whether each node sent to replied. A
        node that left ``max_missed`` messages in a row unanswered is benched (0: never)."""
        for node, replied in answered.items():
            self.misses[node] = 0 if replied else self.misses.get(node, 0) + 1
            if max_missed and self.misses[node] >= max_missed and node in self.nodes:
                self.benched[node] = self.nodes.pop(node)
                self._changes.benched.append(node)
                log(
                    WARNING,
                    "Node %d (client %d) left %d messages in a row unanswered: not sampled "
                    "until it answers again",
                    node,
                    self.clients[node],
                    self.misses[node],
                )

    def _admit(self, node: int, index: int, changes: NodeChanges) -> None:
        """``node`` claims client ``index``: it joins, comes back, or takes the partition
        over from the node that held it (a restarted node comes back under a new id)."""
        info = NodeInfo(node, index)
        self.misses[node] = 0
        self.left.pop(node, None)
        if self.benched.pop(node, None) is not None:
            changes.back.append(node)
        else:
            holders = [
                n
                for pool in (self.nodes, self.benched, self.left)
                for n, i in pool.items()
                if i.client_index == index and n != node
            ]
            for holder in holders:
                for pool in (self.nodes, self.benched, self.left):
                    pool.pop(holder, None)
                changes.reclaimed.append((index, holder, node))
            if not holders:
                changes.joined.append((node, index))
        self.nodes[node] = info
        self.clients[node] = index

    def _ask(
        self, nodes: list[int], timeout: float, keep_unanswered: bool = False
    ) -> list[tuple[int, int]]:
        """(node, client index) of ``nodes`` that say which client they are within
        ``timeout`` (``known`` nodes are not asked), in node order, and of earlier
        unanswered queries that are answered now. Invalid claims are left out, logged.
        With ``keep_unanswered``, a query not answered in time stays open."""
        claims = [(n, self.known[n]) for n in nodes if n in self.known]
        asked = [n for n in nodes if n not in self.known]
        messages = [
            Message(
                RecordDict({INFO_KEY: ConfigRecord({})}),
                dst_node_id=nid,
                message_type=MessageType.QUERY,
            )
            for nid in asked
        ]
        ids = list(self.push_messages(messages)) if messages else []
        self.probes.update(zip(ids, asked, strict=True))
        pending = set(ids)
        deadline = time.monotonic() + timeout
        while self.probes:
            for key, reply in replies_of(self._grid, list(self.probes)):
                pending.discard(key)
                node = self.probes.pop(key)
                index = self._claimed(node, reply)
                if index is not None:
                    claims.append((node, index))
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        if not keep_unanswered:
            for key in pending:
                self.probes.pop(key, None)
        return sorted(claims)

    def _claimed(self, node: int, reply: Message) -> int | None:
        """The client index a discovery reply claims, or None (logged) if invalid."""
        if reply.has_error() or INFO_KEY not in reply.content.config_records:
            log(WARNING, "Node %d did not describe itself; left out", node)
            return None
        index = reply.content.config_records[INFO_KEY].get(CLIENT_INDEX_KEY)
        if not isinstance(index, int) or not 0 <= index < self.population:
            log(
                WARNING,
                "Node %d claims client %r (population %d); left out",
                node,
                index,
                self.population,
            )
            return None
        return index

    def collect(
        self,
        messages: list[Message],
        timeout: float,
        on_reply: Callable[[Message], None] | None = None,
    ) -> list[Message | None]:
        """Send ``messages``; return replies that arrive within ``timeout`` seconds.

        The result is aligned with ``messages``: the reply to each, or None when none
        came by the deadline. Replies to anything else, and duplicates, are ignored.
        """
        ids = list(self.push_messages(messages))
        replies, self.arrival = self.wait_for(ids, timeout, on_reply)
        return [replies.get(k) for k in ids]

    def wait_for(
        self,
        ids: list[str],
        timeout: float,
        on_reply: Callable[[Message], None] | None = None,
    ) -> tuple[dict[str, Message], dict[int, float]]:
        """Replies to the messages ``ids`` (already sent) that arrive within ``timeout``
        seconds (at least those there at once), by message id, and the seconds from now to
        each by source node. Replies to anything else, and duplicates, are ignored (logged)."""
        pending = set(ids)
        arrival: dict[int, float] = {}
        started = time.monotonic()
        replies: dict[str, Message] = {}
        deadline = time.monotonic() + timeout
        looked = False
        while pending and (not looked or time.monotonic() < deadline):
            looked = True
            for key, reply in replies_of(self._grid, list(pending)):
                if key not in pending:
                    log(
                        WARNING,
                        "Ignored a %s reply from node %d to message %s",
                        "duplicate" if key in replies else "late or unknown",
                        reply.metadata.src_node_id,
                        key,
                    )
                    continue
                pending.discard(key)
                replies[key] = reply
                arrival[reply.metadata.src_node_id] = time.monotonic() - started
                if on_reply is not None:
                    on_reply(reply)
            if pending and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
        return replies, arrival


class GatewayGrid(WrappedGrid):
    """Flower's Grid plus the device gateway's phones, which are nodes like any other.

    The round loop wraps this in a :class:`DeviceGrid` as it would Flower's grid:
    node ids are Flower's and the enrolled phones'; messages to a phone go to the
    gateway (:mod:`fedtune.server.gateway`), which answers discovery queries itself and
    turns train messages into tasks; replies come back through ``pull_messages``.
    """

    def __init__(self, grid: Grid, gateway: Any) -> None:
        super().__init__(grid)
        self.gateway = gateway

    def get_node_ids(self) -> Iterable[int]:
        return [*self._grid.get_node_ids(), *self.gateway.node_ids()]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Phones' messages to the gateway, the rest to Flower; ids in the given order."""
        messages = list(messages)
        ids: list[str] = [""] * len(messages)
        flower = []
        for i, message in enumerate(messages):
            if self.gateway.owns_node(message.metadata.dst_node_id):
                ids[i] = self.gateway.push(message)
            else:
                flower.append(i)
        if flower:
            pushed = list(self._grid.push_messages([messages[i] for i in flower]))
            for i, message_id in zip(flower, pushed, strict=True):
                ids[i] = message_id
        return ids

    def pull_replies(self, message_ids: Iterable[str]) -> list[tuple[str, Message]]:
        phones: list[str] = []
        others: list[str] = []
        for message_id in message_ids:
            (phones if self.gateway.owns_message(message_id) else others).append(message_id)
        replies = list(self.gateway.pull(phones)) if phones else []
        if others:
            replies.extend(replies_of(self._grid, others))
        return replies

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [reply for _, reply in self.pull_replies(message_ids)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        ids = [m for m in self.push_messages(messages) if m]
        pending, replies = set(ids), []
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending and (deadline is None or time.monotonic() < deadline):
            for key, reply in self.pull_replies(list(pending)):
                pending.discard(key)
                replies.append(reply)
            if pending:
                time.sleep(POLL_SECONDS)
        return replies
