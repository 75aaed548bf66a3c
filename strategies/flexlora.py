"""FlexLoRA: heterogeneous ranks by averaging full updates and redistributing by SVD.

Jiamu Bai, Daoyuan Chen, Bingchen Qian, Liuyi Yao and Yaliang Li, "Federated
Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources",
NeurIPS 2024 (arXiv:2402.11505).

Each client trains an adapter of its own rank ``r_k`` and the server averages their
*products*: ``W = sum_k p_k B_k @ A_k`` (weights by ``num-examples``), which is what
the clients learned, not a mix of incompatible factors. The global adapter is the
best rank-``lora.r`` factorisation of ``W`` (SVD), with components in decreasing
singular value; a client of rank ``r`` starts from the first ``r`` of them — the best
rank-``r`` approximation of the global update.

The average is computed as FLoRA's stack of the replies (exactly ``W``) and re-factored
without forming ``W`` (see :func:`fedtune.strategies.lora_math.refactor`).
"""

from __future__ import annotations

from fedtune.strategies.lora_math import Adapter, refactor, stack
from fedtune.strategies.ranks import MixedRanks


class FlexLora(MixedRanks):
    """FlexLoRA (Bai et al., NeurIPS 2024): average the updates B @ A, SVD back to factors.

    Parameters are those of :class:`flwr.serverapp.strategy.FedAvg`.
    """

    last_error: float = 0.0
    """Relative error of the last SVD truncation to the global rank (0: exact)."""

    def combine(self, states: list[Adapter], weights: list[float]) -> Adapter:
        """The best global-rank factorisation of the weighted mean of the updates."""
        adapter, self.last_error = refactor(stack(states, weights), self.global_rank())
        return adapter
