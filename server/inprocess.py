"""A Flower Grid whose nodes are ClientApps in this process: a federation without Ray.

Flower's simulation engine runs each ClientApp in a Ray actor, which costs seconds to
start and a process per worker. For a federation that needs no isolation between
clients — tests, benchmarks that compare strategies on the same compute, debugging a
plug-in under a debugger — :class:`InProcessGrid` calls the real ClientApp (fedtune's
by default) on each message as it is pushed, with a Context per node that lives across
rounds as a SuperNode's does, and hands the replies out when pulled. Clients run one
after another, so a round takes the sum of their times.

Use it with :func:`fedtune.server.loop.run_federation` inside
:func:`task_identity` (Flower's messages need a run and task id).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedtune.protocol import PARTITION_KEY


class ListedGrid(Grid):
    """A Flower Grid over a fixed list of node ids whose messages are built here: enough
    for a strategy's ``configure_train`` (which samples node ids and builds messages).
    It has no transport: pushing or pulling messages is refused."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)
        self._run: Run | None = None

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        if self._run is None:
            raise RuntimeError("no run set")
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError(f"{type(self).__name__} has no transport")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError(f"{type(self).__name__} has no transport")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError(f"{type(self).__name__} has no transport")


class InProcessGrid(ListedGrid):
    """Node ``n`` serves client ``clients[n]`` (its ``partition-id``) by calling ``app``
    (default: fedtune's ClientApp) in this process."""

    def __init__(self, clients: dict[int, int], app: Any = None) -> None:
        super().__init__(clients)
        if app is None:
            from fedtune.clients.app import app
        self.app = app
        self.clients = dict(clients)
        self.contexts: dict[int, Context] = {}
        """Each node's Context, made when it is first sent a message: a population of
        nodes never sampled costs a dict entry each."""
        self.replies: dict[str, Message] = {}
        self.silent: set[int] = set()
        """Nodes that have gone away: they answer nothing."""
        self.delivered: list[Message] = []
        self._next = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run each message's ClientApp now; its reply waits for :meth:`pull_messages`.

        The ids are the grid's own (the SuperLink assigns them in a deployment).
        """
        ids = []
        for message in messages:
            self._next += 1
            key = f"in-process-{self._next}"
            # Flower's Metadata has no setters for what the SuperLink fills in.
            message.metadata.__dict__["_message_id"] = key
            ids.append(key)
            self.delivered.append(message)
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            context = self.contexts.get(node)
            if context is None:
                context = Context(1, node, {PARTITION_KEY: self.clients[node]}, RecordDict(), {})
                self.contexts[node] = context
            reply = self.app(message, context)
            reply.metadata.__dict__["_src_node_id"] = node
            reply.metadata.__dict__["_reply_to_message_id"] = key
            self.replies[key] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(k) for k in list(message_ids) if k in self.replies]

    def add_node(self, node: int, index: int) -> None:
        """A node joins serving client ``index`` (a restarted one comes back under a new
        id, with a fresh Context, as a restarted SuperNode does)."""
        self.node_ids.append(node)
        self.clients[node] = index

    def remove_node(self, node: int) -> None:
        """A node leaves: no longer listed, and it answers nothing."""
        self.node_ids.remove(node)
        self.silent.add(node)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))


@contextlib.contextmanager
def task_identity() -> Iterator[None]:
    """The run and task identity Flower needs to build messages outside a Flower
    process (as a ServerApp has), restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
