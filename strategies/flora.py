"""FLoRA: exact aggregation of LoRA updates of any ranks by stacking.

Ziyao Wang, Zheyu Shen, Yexiao He, Guoheng Sun, Hongyi Wang, Lingjuan Lyu and Ang Li,
"FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024 (arXiv:2409.05976).

Averaging A and B separately is not averaging updates (``mean(B_k) @ mean(A_k) !=
mean(B_k @ A_k)``). Stacking is: with ``A = [A_1; ...; A_n]`` and ``B = [p_1 B_1, ...,
p_n B_n]``, ``B @ A = sum_k p_k B_k @ A_k`` exactly, for any ranks ``r_k``. In the
paper each client merges the stacked update into its base weights and trains a fresh
LoRA on top every round.

Here: the client receives the global adapter (whole, whatever its own rank), merges it
into its copy of the base weights (the ``fresh_adapter`` trait; fedtune's ClientApp
restores the weights afterwards), trains a fresh adapter of its rank from
PEFT's init (B = 0) and uploads it. ``aggregate_train`` stacks the global adapter
(weight 1) with the clients' fresh adapters (weights ``p_k``, by ``num-examples``):
the product is the old global update plus the clients' weighted updates, exactly.

What differs from the paper: the paper's clients keep the merged full weights; fedtune
keeps the global update as an adapter of rank ``lora.r`` (what the server evaluates,
saves and sends). The exact stack is re-factored to that rank by an SVD of its
product — lossless while the stack's rank fits, otherwise the best rank-``lora.r``
approximation. The relative error dropped is logged every round.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord
from flwr.common.logger import log

from fedtune.protocol import StrategyTraits
from fedtune.strategies.lora_math import Adapter, refactor, stack
from fedtune.strategies.ranks import MixedRanks


class Flora(MixedRanks):
    """FLoRA (Wang et al., NeurIPS 2024): stacked client adapters, exact for mixed ranks.

    Parameters are those of :class:`flwr.serverapp.strategy.FedAvg`.
    """

    traits = StrategyTraits(mixed_ranks=True, fresh_adapter=True)
    last_error: float = 0.0
    """Relative error of the last re-factorisation to the global rank (0: exact)."""

    def download(self, arrays: ArrayRecord, rank: int) -> ArrayRecord:
        """The whole global adapter: every client merges all of it."""
        return arrays

    def combine(self, states: list[Adapter], weights: list[float]) -> Adapter:
        """The global adapter plus the stacked client adapters, at the global rank."""
        stacked = stack([self.sent(), *states], [1.0, *weights])
        adapter, self.last_error = refactor(stacked, self.global_rank())
        log(INFO, "FLoRA: stacked rank re-factored, relative error %.2e", self.last_error)
        return adapter
