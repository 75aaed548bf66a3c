"""Helpers for driving Flower strategies outside a run: a node list and a task identity."""

from __future__ import annotations

from fedtune.server.inprocess import InProcessGrid, ListedGrid, task_identity

__all__ = ["InProcessGrid", "NodeListGrid", "federation", "task_identity"]


NodeListGrid = ListedGrid
"""A node list for driving strategies: Flower's Grid with no transport."""


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
