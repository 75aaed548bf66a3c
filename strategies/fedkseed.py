"""FedKSeed: federated zeroth-order training where only seeds and scalars travel.

Zhen Qin, Daoyuan Chen, Bingchen Qian, Bolin Ding, Yaliang Li and Shuiguang Deng,
"Federated Full-Parameter Tuning of Billion-Sized Language Models with Communication
Cost under 18 Kilobytes", ICML 2024 (arXiv:2312.06353).

Every client trains with the ``zeroth`` engine: each local step is a
``(seed index, projected-gradient scalar)`` pair over the run's pool of K seeds
(:mod:`fedtune.engines.seeds`). The round loop replays each client's steps on the
adapter it sent, validates the result like any update, and hands this strategy the
replayed adapters with the steps alongside (a ``seed-steps`` config record per reply).

``aggregate_train`` does not average the adapters: it merges the clients' steps into
one weighted step per seed index used (``sum_c w_c/W g_c,j``, FedKSeed's aggregation)
and replays *that* on the adapter sent. The new global adapter is therefore the old one
plus a short list of steps — :attr:`seed_history` keeps one list per aggregation — and
a client that kept an older global adapter catches up by replaying the lists since,
bit for bit (the round loop sends them instead of the adapter when they are smaller,
with the adapter's digest to check against). Up to fp32 rounding this is the FedAvg of
the replayed adapters.

Deviation from the paper: FedKSeed also scores seeds by the magnitude of their
accumulated scalars and samples them non-uniformly (FedKSeed-Pro); fedtune samples
seeds uniformly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.engines.seeds import SeedStep, aggregate_steps, replay, seed_pool
from fedtune.errors import ConfigError
from fedtune.protocol import SEEDS_KEY, StrategyTraits, TrainInstructions
from fedtune.wire import from_record, to_record


class FedKSeed(FedAvg):
    """FedKSeed (Qin et al., ICML 2024): weighted seed steps, replayed on the server.

    Parameters are those of :class:`flwr.serverapp.strategy.FedAvg`. Needs
    ``client.engine = "zeroth"``; ``configure_train`` and ``aggregate_train`` must be
    called in that order each round (fedtune's round loop does).
    """

    traits = StrategyTraits(seed_steps=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed_history: list[list[SeedStep]] = []
        """The merged steps of each aggregation: version v of the global adapter is the
        initial one with lists 1..v replayed."""
        self._sent: ArrayRecord | None = None
        self._replay: tuple[list[int], float] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling and messages; keeps the adapter sent and the seed pool."""
        scenario = TrainInstructions.from_config(config).scenario
        client = scenario.client
        if client.engine != "zeroth":
            raise ConfigError(
                f"strategy 'fedkseed' aggregates seed steps: it needs client.engine = "
                f"'zeroth', not {client.engine!r}"
            )
        self._sent = arrays
        self._replay = (seed_pool(scenario.run.seed, client.num_seeds), client.lr)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The adapter sent with the clients' merged, weighted steps replayed on it."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid or self._sent is None or self._replay is None:
            return None, None
        contents = [message.content for message in valid]
        histories, weights = [], []
        for content in contents:
            if SEEDS_KEY not in content.config_records:
                raise ConfigError("strategy 'fedkseed' got a reply without seed steps")
            record = content.config_records[SEEDS_KEY]
            indices = cast(list[int], record["index"])
            scalars = cast(list[float], record["scalar"])
            histories.append([(int(i), float(g)) for i, g in zip(indices, scalars, strict=True)])
            metrics = next(iter(content.metric_records.values()))
            weights.append(float(cast(float, metrics[self.weighted_by_key])))
        merged = aggregate_steps(histories, weights)
        pool, lr = self._replay
        adapter = replay(from_record(self._sent), merged, pool, lr)
        self.seed_history.append(merged)
        return to_record(adapter), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the history of merged steps."""
        return {"seed_history": [[(int(i), float(g)) for i, g in s] for s in self.seed_history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed_history = [[(int(i), float(g)) for i, g in s] for s in state["seed_history"]]
