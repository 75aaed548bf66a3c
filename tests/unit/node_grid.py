"""Helpers for driving Flower strategies outside a run: a node list and a task identity."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedtune.server.inprocess import InProcessGrid, task_identity

__all__ = ["InProcessGrid", "NodeListGrid", "federation", "task_identity"]


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
