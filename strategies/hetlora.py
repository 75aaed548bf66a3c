"""HetLoRA: heterogeneous LoRA ranks by truncation and zero-padded, norm-weighted averaging.

Yae Jee Cho, Luyang Liu, Zheng Xu, Aldi Fahrezi and Gauri Joshi, "Heterogeneous LoRA
for Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024
(arXiv:2401.06432).

A client of rank ``r`` receives the global adapter's first ``r`` components (rows of
A, columns of B) and trains them. The server zero-pads every reply to the global rank
and averages the factors with HetLoRA's *sparsity-weighted* aggregation: client ``k``
weighs ``||B_k @ A_k||_F`` (normalised), so a small-rank client whose update carries
little does not dilute the components only larger-rank clients train. With
``weighting = "examples"`` the weights are FedAvg's ``num-examples`` instead.

Not implemented: the paper's rank self-pruning on clients (ranks here are fixed per
device tier).
"""

from __future__ import annotations

from fedtune.strategies.lora_math import Adapter, pad, product_norm, weighted_average
from fedtune.strategies.ranks import MixedRanks

WEIGHTINGS = ("norm", "examples")


class HetLora(MixedRanks):
    """HetLoRA (Cho et al., EMNLP 2024): truncated ranks, zero-padded norm-weighted mean.

    Parameters
    ----------
    weighting : str (default: "norm")
        ``"norm"``: weight each reply by the Frobenius norm of its update ``B @ A``
        (the paper's sparsity-weighted aggregation); ``"examples"``: by ``num-examples``.
    **kwargs
        Those of :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, *, weighting: str = "norm", **kwargs) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        super().__init__(**kwargs)
        self.weighting = weighting

    def combine(self, states: list[Adapter], weights: list[float]) -> Adapter:
        """The replies zero-padded to the global rank and averaged."""
        if self.weighting == "norm":
            norms = [product_norm(s) for s in states]
            # All-zero updates carry nothing to weigh: fall back to num-examples.
            weights = norms if sum(norms) > 0 else weights
        rank = self.global_rank()
        return weighted_average([pad(s, rank) for s in states], weights)
