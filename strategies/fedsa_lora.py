"""FedSA-LoRA: share and aggregate LoRA's A; each client keeps its own B.

Pengxin Guo, Shuang Zeng, Yanran Wang, Huijie Fan, Feifei Wang and Liangqiong Qu,
"Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025
(arXiv:2410.01463).

The paper finds that the A factors learn what clients have in common and the B
factors what is particular to each client: A is averaged by the server, B never
leaves the client's model (a personalised adapter ``(mean A, B_i)`` per client).

Server side (this class): it declares ``keeps_local = "B"`` (the round loop tells
clients to keep their B);
``aggregate_train`` is FedAvg's, unchanged: it averages every tensor weighted by
``num-examples`` (see "The global B" below for why B is averaged too). Client side:
fedtune's ClientApp keeps its B in the node's ``context.state`` after training and,
from its second round on, puts it in place of the B it received (``fedtune.clients.local_state``).

The global B. The server has no client of its own, yet it must return a whole
adapter: its held-out evaluation scores one, the final ``adapter/`` is one, and a
client's *first* round starts from the B it receives. That B is the weighted average
of the clients' B (the same weights as A) — a stand-in that no client trains from once
it has its own. So the server's perplexity under FedSA-LoRA measures the shared A
with an averaged B, not the personalised adapters the method optimises; those would
be scored by federated evaluation on the clients' local held-out text. With the
weights of A, the returned adapter equals FedAvg's: what makes this FedSA-LoRA is
that clients ignore the B they receive after their first round.

Clients still upload their B (fedtune validates that a reply has the keys that were
sent), so bytes up are those of FedAvg, not the paper's A-only upload.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedtune.protocol import StrategyTraits


class FedSaLora(FedAvg):
    """FedSA-LoRA (Guo et al., ICLR 2025): A shared and averaged, B kept by each client.

    Parameters are those of :class:`flwr.serverapp.strategy.FedAvg`. The global adapter
    returned carries the clients' averaged B, for the server's evaluation and for
    clients in their first round only (see the module docstring).
    """

    traits = StrategyTraits(keeps_local="B")
