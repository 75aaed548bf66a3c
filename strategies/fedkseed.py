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

With ``importance = True`` (FedKSeed-Pro) clients draw seeds non-uniformly: each
message carries a probability per seed of the pool (a softmax of each seed's min-max
normalized mean scalar amplitude so far, :func:`fedtune.engines.seeds.seed_probabilities`;
4 bytes a seed), so seeds whose directions moved the loss more are probed more often.
Phones (the device gateway) draw uniformly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedtune.engines.seeds import aggregate_steps, replay, seed_probabilities
from fedtune.protocol import SEED_WEIGHTS_KEY, StrategyTraits
from fedtune.strategies.seed_steps import SeedStepStrategy
from fedtune.wire import to_record


class FedKSeed(SeedStepStrategy):
    """FedKSeed (Qin et al., ICML 2024): weighted seed steps, replayed on the server.

    Parameters are those of :class:`flwr.serverapp.strategy.FedAvg`. Needs
    ``client.engine = "zeroth"``.
    """

    traits = StrategyTraits(seed_steps=True)
    engine = "zeroth"

    def __init__(self, importance: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.importance = importance
        """FedKSeed-Pro: clients draw seeds with probabilities by importance."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling and messages; under ``importance``, each message carries
        the seed probabilities."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if not self.importance:
            return messages
        weights = seed_probabilities(self.seed_history, len(self._pool))
        if weights is not None:
            record = ArrayRecord({"p": Array(weights.astype(np.float32))})
            for message in messages:
                message.content[SEED_WEIGHTS_KEY] = record
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The adapter sent with the clients' merged, weighted steps replayed on it."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        contents = [message.content for message in valid]
        histories, weights = [], []
        for content in contents:
            histories.append(self.steps_of(content))
            metrics = next(iter(content.metric_records.values()))
            weights.append(float(cast(float, metrics[self.weighted_by_key])))
        merged = aggregate_steps(histories, weights)
        adapter = replay(self.sent_adapter(), merged, self._pool, self._lr)
        self.seed_history.append(merged)
        return to_record(adapter), self.train_metrics_aggr_fn(contents, self.weighted_by_key)
