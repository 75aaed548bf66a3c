"""Helpers for driving Flower strategies outside a run: a node list and a task identity."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class NodeListGrid(Grid):
    """Flower's :class:`~flwr.serverapp.Grid` over a fixed list of node ids.

    Enough for ``configure_train`` (which samples node ids and builds messages); it
    has no transport, so pushing or pulling messages is refused.
    """

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
        raise NotImplementedError("NodeListGrid has no transport")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("NodeListGrid has no transport")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError("NodeListGrid has no transport")


@contextlib.contextmanager
def task_identity() -> Iterator[None]:
    """The task identity Flower needs to build a Message outside a run, then restore it."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def federation(strategy, scenario, clients: dict[int, int], fleet=None, adapter=None):  # noqa: ANN001, ANN201
    """A :class:`fedtune.server.round.Federation` over a :class:`NodeListGrid` whose nodes
    serve ``clients`` (node id -> client index), for driving the round's steps."""
    from fedtune.protocol import traits_of
    from fedtune.server.grid import DeviceGrid, NodeInfo
    from fedtune.server.round import Federation, max_update_bytes
    from fedtune.server.seed_sync import SeedSync
    from fedtune.wire import expected_specs

    grid = DeviceGrid(NodeListGrid(clients))
    grid.nodes = {node: NodeInfo(node, index) for node, index in clients.items()}
    mixed = fleet.mixed_ranks(scenario.lora.r) if fleet is not None else {}
    traits = traits_of(strategy)
    client = scenario.client
    return Federation(
        scenario=scenario,
        strategy=strategy,
        traits=traits,
        grid=grid,
        fleet=fleet,
        seeds=SeedSync(scenario.run.seed, client.num_seeds, client.lr, client.local_steps),
        attackers=frozenset(),
        specs=expected_specs(adapter or {}),
        max_bytes=max_update_bytes(adapter or {}),
        mixed=mixed,
    )


class InProcessGrid(NodeListGrid):
    """A Flower Grid that delivers each message to a real ClientApp in this process.

    Node ``n`` serves client ``clients[n]`` (its ``partition-id``) with a Context of its
    own that lives across rounds, as a SuperNode's does. ``push_messages`` runs the
    app at once; ``pull_messages`` hands out the replies. For driving
    :func:`fedtune.server.loop.run_federation` end to end where Ray adds nothing.
    """

    def __init__(self, clients: dict[int, int], app=None) -> None:  # noqa: ANN001
        from flwr.app import Context, RecordDict

        super().__init__(clients)
        if app is None:
            from fedtune.clients.app import app
        self.app = app
        self.contexts = {
            node: Context(1, node, {"partition-id": index}, RecordDict(), {})
            for node, index in clients.items()
        }
        self.replies: dict[str, Message] = {}
        self.silent: set[int] = set()
        """Nodes that have gone away: they answer nothing."""
        self.delivered: list[Message] = []
        self._next = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self._next += 1
            key = f"m{self._next}"
            message.metadata.__dict__["_message_id"] = key
            ids.append(key)
            self.delivered.append(message)
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            reply = self.app(message, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            reply.metadata.__dict__["_reply_to_message_id"] = key
            self.replies[key] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(k) for k in list(message_ids) if k in self.replies]
