"""FedAdam: Adam as the server optimizer over the clients' averaged adapter update.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv:2003.00295).

This is Flower's :class:`~flwr.serverapp.strategy.FedAdam`, with one adaptation.
Flower computes the bias-corrected step size as a NumPy ``float64`` scalar, and under
NumPy 2's promotion rules (NEP 50) that scalar turns the ``float32`` adapter into
``float64``: from the first round on, the global adapter would change dtype (twice the
checkpoint size, and a server state that differs from the ``float32`` adapter clients
receive). The subclass casts the result back to the dtype of the adapter sent in
``configure_train``; the maths are Flower's.

Like every FedOpt strategy, ``aggregate_train`` needs the adapter sent in the same
round, which ``configure_train`` keeps (``current_arrays``): call them in that order,
as fedtune's round loop does.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as flwr_strategy


class FedAdam(flwr_strategy.FedAdam):
    """FedAdam (Reddi et al., 2021): Adam on the server; the adapter keeps its dtype.

    Parameters are those of :class:`flwr.serverapp.strategy.FedAdam`: ``eta`` (server
    learning rate), ``beta_1``, ``beta_2``, ``tau`` (adaptivity), and the FedAvg
    sampling and record-key arguments. ``eta_l`` is recorded but unused: the client
    learning rate is ``client.lr``.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAdam step, returned in the dtype of the adapter sent.

        Parameters
        ----------
        server_round : int
            The current round.
        replies : Iterable[Message]
            Training replies, each with one ArrayRecord and one MetricRecord.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord | None]
            The new global adapter (``None`` without valid replies) and the
            aggregated training metrics.
        """
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.current_arrays is None:
            return arrays, metrics
        sent = self.current_arrays
        return (
            ArrayRecord(
                {k: Array(np.asarray(arrays[k].numpy(), dtype=sent[k].dtype)) for k in arrays}
            ),
            metrics,
        )
