"""FFA-LoRA: federated LoRA with A frozen at its initialisation; only B is trained.

Youbang Sun, Zitao Li, Yaliang Li and Bolin Ding, "Improving LoRA in
Privacy-preserving Federated Learning", ICLR 2024 (arXiv:2403.12313).

Averaging the two LoRA factors separately is not averaging the clients' updates:
``mean(B_i) @ mean(A_i) != mean(B_i @ A_i)``. With A fixed and shared, the update
``B @ A`` is linear in B, so ``mean(B_i) @ A`` *is* the average update, exactly; and
only half of the adapter is trained (less noise to add under differential privacy,
which is the paper's main motive).

Server side (this class): it declares ``trains = "B"`` (the round loop tells clients
to train only B) and keeps the adapter it sent;
``aggregate_train`` averages the clients' ``lora_B`` tensors (weighted by
``num-examples``) and returns every other tensor — A included — exactly as sent, so A
stays at its seeded initialisation for the whole run whatever the clients reply.
Client side: fedtune's engines honour the instruction (only ``lora_B`` weights get
gradients and optimizer state).

The server's held-out evaluation scores the global adapter ``(A_0, mean B)``: the
adapter every sampled client starts its next round from.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.protocol import StrategyTraits
from fedtune.strategies.lora_math import select, unpack_replies, weighted_average
from fedtune.wire import from_record, to_record


class FfaLora(FedAvg):
    """FFA-LoRA (Sun et al., ICLR 2024): A frozen at init, only B trained and averaged.

    Parameters are those of :class:`flwr.serverapp.strategy.FedAvg`. ``configure_train``
    and ``aggregate_train`` must be called in that order each round (fedtune's round
    loop does): the adapter sent is the source of the returned A.
    """

    traits = StrategyTraits(trains="B")
    sent_arrays: ArrayRecord | None = None
    """The adapter sent by the last ``configure_train`` (checkpointed as strategy state)."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling and messages; keeps the adapter sent."""
        self.sent_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The adapter sent with its ``lora_B`` tensors replaced by the clients' average.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord | None]
            The new global adapter (``None`` without valid replies or before any
            ``configure_train``) and the aggregated training metrics.
        """
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid or self.sent_arrays is None:
            return None, None
        contents = [message.content for message in valid]
        states, weights = unpack_replies(contents, self.arrayrecord_key, self.weighted_by_key)
        averaged_b = weighted_average([select(s, ["B"]) for s in states], weights)
        adapter = {**from_record(self.sent_arrays), **averaged_b}
        return to_record(adapter), self.train_metrics_aggr_fn(contents, self.weighted_by_key)
