"""What every strategy over seed steps shares: the adapter sent, the seed pool, the
replies' steps, and the history of merged steps that clients catch up from.

A seed-step strategy's new global adapter is the one it sent plus a list of
``(seed index, scalar)`` steps replayed on it (:func:`fedtune.engines.seeds.replay`);
:attr:`SeedStepStrategy.seed_history` keeps one list per aggregation, so a client that
kept an older global adapter rebuilds the current one bit for bit (the round loop sends
the steps in place of the adapter when they are smaller).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.config import Scenario
from fedtune.engines.seeds import SeedStep, seed_pool
from fedtune.errors import ConfigError
from fedtune.protocol import SEEDS_KEY, TrainInstructions
from fedtune.wire import from_record


class SeedStepStrategy(FedAvg):
    """FedAvg's sampling and messages, for clients that reply seed steps.

    Subclasses set :attr:`engine` and aggregate with :meth:`steps_of` and
    :meth:`replayed`; ``configure_train`` and ``aggregate_train`` must be called in that
    order each round (fedtune's round loop does).
    """

    engine: ClassVar[str] = "zeroth"
    """The ``client.engine`` whose seed steps this strategy aggregates."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed_history: list[list[SeedStep]] = []
        """The merged steps of each aggregation: version v of the global adapter is the
        initial one with lists 1..v replayed."""
        self._sent: ArrayRecord | None = None
        self._pool: list[int] = []
        self._lr = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling and messages; keeps the adapter sent and the seed pool."""
        self.remember(arrays, config)
        return super().configure_train(server_round, arrays, config, grid)

    def remember(self, arrays: ArrayRecord, config: ConfigRecord) -> Scenario:
        """Keep what aggregation replays on (the adapter, the pool, the learning rate);
        refuse clients of another engine."""
        scenario = TrainInstructions.from_config(config).scenario
        client = scenario.client
        if client.engine != self.engine:
            raise ConfigError(
                f"strategy {type(self).__name__} aggregates seed steps of engine "
                f"{self.engine!r}: it needs client.engine = {self.engine!r}, not "
                f"{client.engine!r}"
            )
        self._sent = arrays
        self._pool = seed_pool(scenario.run.seed, client.num_seeds)
        self._lr = client.lr
        return scenario

    @staticmethod
    def steps_of(content: RecordDict) -> list[SeedStep]:
        """A reply's seed steps (the loop validated them and keeps them as a config
        record: the array record holds the replayed adapter)."""
        if SEEDS_KEY not in content.config_records:
            raise ConfigError("a seed-step strategy got a reply without seed steps")
        record = content.config_records[SEEDS_KEY]
        indices = cast(list[int], record["index"])
        scalars = cast(list[float], record["scalar"])
        return [(int(i), float(g)) for i, g in zip(indices, scalars, strict=True)]

    def sent_adapter(self) -> Any:
        if self._sent is None:
            raise ConfigError("aggregate_train before configure_train")
        return from_record(self._sent)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the history of merged steps."""
        return {"seed_history": [[(int(i), float(g)) for i, g in s] for s in self.seed_history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed_history = [[(int(i), float(g)) for i, g in s] for s in state["seed_history"]]
