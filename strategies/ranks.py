"""What a strategy does to train clients of different LoRA ranks (device tiers).

A tier of ``simulations/devices.toml`` may give its clients a ``lora_rank`` below the
scenario's ``lora.r`` (the global rank). Averaging adapters of different shapes is
undefined, so fedtune's round loop only mixes ranks under a strategy that says how:
one whose traits declare ``mixed_ranks`` and that has a :meth:`MixedRanks.download`
method. For every
sampled client of rank ``r`` the loop sends ``download(global, r)`` with
that rank in its instructions, and validates the reply against rank-``r`` shapes;
``aggregate_train`` then receives replies of several ranks and must return an adapter
of the global rank. Any other strategy given mixed ranks is refused before round 1.

:class:`MixedRanks` is the shared base of fedtune's rank-aware built-ins (FLoRA,
HetLoRA, FlexLoRA): FedAvg's sampling and messages, the adapter last sent kept as
state (it fixes the global rank), and an ``aggregate_train`` that hands the replies,
unpacked as (adapter, weight), to the subclass's :meth:`MixedRanks.combine`.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.protocol import StrategyTraits
from fedtune.strategies.lora_math import Adapter, rank_of, truncate, unpack_replies
from fedtune.wire import from_record, to_record


class MixedRanks(FedAvg):
    """FedAvg's sampling for strategies that train clients of several LoRA ranks."""

    traits = StrategyTraits(mixed_ranks=True)
    sent_arrays: ArrayRecord | None = None
    """The global adapter sent by the last ``configure_train`` (checkpointed)."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def download(self, arrays: ArrayRecord, rank: int) -> ArrayRecord:
        """What a client of ``rank`` starts from: the first ``rank`` components."""
        return to_record(truncate(from_record(arrays), rank))

    def sent(self) -> Adapter:
        if self.sent_arrays is None:
            raise RuntimeError(f"{type(self).__name__}.aggregate_train before configure_train")
        return from_record(self.sent_arrays)

    def global_rank(self) -> int:
        return rank_of(self.sent())

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The adapter :meth:`combine` makes of the valid replies, and their metrics.

        Returns ``(None, None)`` without valid replies or before any ``configure_train``.
        """
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid or self.sent_arrays is None:
            return None, None
        contents = [m.content for m in valid]
        states, weights = unpack_replies(contents, self.arrayrecord_key, self.weighted_by_key)
        total = sum(weights)
        adapter = self.combine(states, [w / total for w in weights])
        return to_record(adapter), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def combine(self, states: list[Adapter], weights: list[float]) -> Adapter:
        """The new global adapter (global rank) from replies of any ranks and their
        normalised ``num-examples`` weights."""
        raise NotImplementedError
