"""DeviceGrid: Flower's Grid with known clients, a stable node order, and deadlines.

Flower gives nodes random ids, so "the same seed samples the same clients" needs a
map from node to client. At start the grid asks every node (a ``query`` message)
which client it is (its ``partition-id``), and from then on lists node ids in client
order. Strategies sample from that list as from any Flower grid.

:meth:`DeviceGrid.collect` replaces ``send_and_receive`` in the round loop: it
reports each reply as it arrives and stops at the deadline, so a node that vanishes
is a timeout, not a crash.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
    """A :class:`flwr.serverapp.Grid` wrapper whose nodes are known clients."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.nodes: dict[int, NodeInfo] = {}
        self.available: set[int] | None = None
        """Nodes eligible this round (None: all); set by the loop from device tiers."""
        self.arrival: dict[int, float] = {}
        """Seconds from sending to each reply, by source node (the last ``collect``)."""
        self.message_ids: dict[int, str] = {}
        """The id of the last message each node was sent."""

    def get_node_ids(self) -> Iterable[int]:
        """Known (and, if set, available) nodes, in client order: stable across runs."""
        nodes = sorted(self.nodes.values(), key=lambda n: n.client_index)
        return [n.node_id for n in nodes if self.available is None or n.node_id in self.available]

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
        return self.nodes[node_id].client_index

    def measured_transfer(self, node_id: int) -> tuple[int, int] | None:
        """(bytes down, bytes up) a phone moved for the last message sent to it, as the
        device gateway counted them; None for a Flower node (its records are measured)."""
        inner = self._grid
        message_id = self.message_ids.get(node_id)
        if isinstance(inner, GatewayGrid) and message_id and inner.gateway.owns_node(node_id):
            return inner.gateway.transfer(message_id)
        return None

    def discover(self, expected: int, population: int, timeout: float) -> dict[int, NodeInfo]:
        """Wait for ``expected`` nodes, ask each which client it is, keep the valid ones.

        A node whose client index is outside ``[0, population)`` or duplicates another
        node's is left out with a logged reason.
        """
        deadline = time.monotonic() + timeout
        while len(ids := list(self._grid.get_node_ids())) < expected:
            if time.monotonic() > deadline:
                log(
                    WARNING, "Only %d of %d nodes connected; going on with them", len(ids), expected
                )
                break
            time.sleep(0.2)
        messages = [
            Message(
                RecordDict({INFO_KEY: ConfigRecord({})}),
                dst_node_id=nid,
                message_type=MessageType.QUERY,
            )
            for nid in sorted(ids)
        ]
        replies = self.collect(messages, max(deadline - time.monotonic(), 5.0))
        found: dict[int, NodeInfo] = {}
        taken: set[int] = set()
        for reply in replies:
            if reply is None:
                continue
            node = reply.metadata.src_node_id
            if reply.has_error() or INFO_KEY not in reply.content.config_records:
                log(WARNING, "Node %d did not describe itself; left out", node)
                continue
            index = reply.content.config_records[INFO_KEY].get(CLIENT_INDEX_KEY)
            if not isinstance(index, int) or not 0 <= index < population or index in taken:
                log(
                    WARNING,
                    "Node %d claims client %r (population %d); left out",
                    node,
                    index,
                    population,
                )
                continue
            taken.add(index)
            found[node] = NodeInfo(node, index)
        self.nodes = found
        log(INFO, "Discovered %d client nodes", len(found))
        return found

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
        pending = set(ids)
        self.arrival = {}
        started = time.monotonic()
        replies: dict[str, Message] = {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
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
                self.arrival[reply.metadata.src_node_id] = time.monotonic() - started
                if on_reply is not None:
                    on_reply(reply)
            if pending:
                time.sleep(POLL_SECONDS)
        return [replies.get(k) for k in ids]


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
