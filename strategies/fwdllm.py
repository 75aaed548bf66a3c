"""FwdLLM: federated forward-gradient fine-tuning by perturbed inferences.

Mengwei Xu, Dongqi Cai, Yaozong Wu, Xiang Li and Shangguang Wang, "FwdLLM: Efficient
Federated Finetuning of Large Language Models with Perturbed Inferences", USENIX ATC
2024 (arXiv:2308.13894).

A round is one global step. Every sampled client evaluates, at the *same* global
adapter and without a local step, the directional derivative ``g_i = grad L . z_i`` of
its loss along ``probes`` directions ``z_i`` of the run's seed pool
(``client.engine = "forward"``: forward-mode AD, or two perturbed inferences with
``client.forward_derivative = "fd"``), and replies ``(pool index, g_i)`` per direction
— 8 bytes each. The server pools every client's probes into one estimate
``mean_i g_i z_i`` and takes an SGD step with ``client.lr``. The step is itself a list
of seed steps (:func:`fedtune.engines.seeds.merge_probes`), kept in
:attr:`seed_history`, so clients catch up from seeds as under FedKSeed.

FwdLLM's two designs that make this converge:

- *Global perturbation pacing*: after each wave of replies the round loop asks
  :meth:`FwdLLM.more_clients`; while the pooled estimate's variance per value is above
  ``variance_threshold``, more clients are sampled (``wave`` at a time, at most
  ``max_clients`` a round, within ``round.deadline_s``).
- *Discriminative perturbation sampling*: each client rebuilds the previous round's
  estimate (the guide) from its merged steps, sent along, and keeps a candidate
  direction only when its cosine with the guide is at least ``guide_sigmas`` times a
  random direction's, ``1/sqrt(D)`` (:func:`fedtune.engines.seeds.pick_directions`).

Deviations from the paper: directions are ±1 vectors from a finite seed pool (so steps
replay bit for bit and upload as seeds), and the threshold is in units of a random
direction's cosine rather than an absolute cosine, so one value serves any adapter
size.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedtune.engines.seeds import SeedStep, merge_probes, pooled_estimate, replay, trained_keys
from fedtune.errors import ConfigError
from fedtune.protocol import (
    GUIDE_KEY,
    GUIDE_SIGMAS_KEY,
    GUIDE_TRIES,
    GUIDE_TRIES_KEY,
    MAX_PROBES,
    PROBES_KEY,
    StrategyTraits,
)
from fedtune.strategies.seed_steps import SeedStepStrategy
from fedtune.wire import seeds_to_record, to_record


class FwdLLM(SeedStepStrategy):
    """FwdLLM (Xu et al., USENIX ATC 2024): clients' forward-gradient probes, pooled.

    One global SGD step a round, with pacing and discriminative sampling.

    Parameters
    ----------
    probes
        Directions each client evaluates.
    variance_threshold
        Pacing: sample more clients while the pooled estimate's variance per value is
        above this (0: never; the round's first wave only).
    max_clients
        Pacing: at most this many clients a round (0: twice the first wave).
    wave
        Pacing: clients added per extra wave (0: half the first wave, at least 1).
    guide_sigmas
        Discriminative sampling threshold (0, the default: uniform directions, which
        gained more per forward pass than 1.0 in ``benchmarks/RESULTS.md``; FwdLLM's
        design, measured there, is 1.0).
    guide_tries
        Candidates a client draws per kept direction.
    trains
        The LoRA factors probed and stepped: ``all``, or ``B`` alone (as FFA-LoRA: fewer
        dimensions for the same probes; ``A`` stays as initialized from ``run.seed``).
    **kwargs
        Those of :class:`flwr.serverapp.strategy.FedAvg`.
    """

    traits = StrategyTraits(seed_steps=True, seed_engine="forward", paced=True)
    engine = "forward"

    def __init__(
        self,
        probes: int = 8,
        variance_threshold: float = 0.0,
        max_clients: int = 0,
        wave: int = 0,
        guide_sigmas: float = 0.0,
        guide_tries: int = GUIDE_TRIES,
        trains: str = "all",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if trains not in ("all", "B"):
            raise ConfigError(f"strategy.trains must be 'all' or 'B', got {trains!r}")
        self.traits = StrategyTraits(
            seed_steps=True, seed_engine="forward", paced=True, trains=trains
        )
        if not 1 <= probes <= MAX_PROBES:
            raise ConfigError(f"strategy.probes must be in [1, {MAX_PROBES}], got {probes!r}")
        if not variance_threshold >= 0:
            raise ConfigError(
                f"strategy.variance_threshold must be >= 0, got {variance_threshold!r}"
            )
        if max_clients < 0 or wave < 0:
            raise ConfigError("strategy.max_clients and strategy.wave must be >= 0")
        if not 0 <= guide_sigmas <= 10:
            raise ConfigError(f"strategy.guide_sigmas must be in [0, 10], got {guide_sigmas!r}")
        if not 1 <= guide_tries <= 1024:
            raise ConfigError(f"strategy.guide_tries must be in [1, 1024], got {guide_tries!r}")
        self.probes = probes
        self.variance_threshold = variance_threshold
        self.max_clients = max_clients
        self.wave = wave
        self.guide_sigmas = guide_sigmas
        self.guide_tries = guide_tries
        self._first_wave = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling; each message asks for probes and carries the guide."""
        self.remember(arrays, config)
        config = ConfigRecord(
            {
                **dict(config),
                PROBES_KEY: self.probes,
                GUIDE_SIGMAS_KEY: self.guide_sigmas,
                GUIDE_TRIES_KEY: self.guide_tries,
            }
        )
        messages = list(super().configure_train(server_round, arrays, config, grid))
        guide = self.seed_history[-1] if self.seed_history and self.guide_sigmas else None
        for message in messages:
            if guide:
                message.content[GUIDE_KEY] = seeds_to_record(guide)
        self._first_wave = len(messages)
        return messages

    def pooled(self, replies: Iterable[Message]) -> list[SeedStep]:
        """Every probe of ``replies``, in reply order."""
        return [step for message in replies for step in self.steps_of(message.content)]

    def estimate_variance(self, probes: list[SeedStep]) -> float:
        """The pooled estimate's variance per value (inf below two probes)."""
        adapter = self.sent_adapter()
        keys = trained_keys(adapter, self.traits.trains)
        specs = [(k, tuple(adapter[k].shape)) for k in keys]
        return pooled_estimate(probes, self._pool, specs)[1] if probes else float("inf")

    def more_clients(self, server_round: int, replies: list[Message], asked: int) -> int:
        """Pacing: how many more clients this round should ask (0: enough).

        More while the estimate's variance is above ``variance_threshold`` and fewer
        than ``max_clients`` have been asked.
        """
        if not self.variance_threshold:
            return 0
        cap = self.max_clients or 2 * self._first_wave
        if asked >= cap:
            return 0
        if self.estimate_variance(self.pooled(replies)) <= self.variance_threshold:
            return 0
        return min(self.wave or max(1, self._first_wave // 2), cap - asked)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One SGD step along the mean of every client's probes, replayed on the sent
        adapter; the step's merged seed steps join :attr:`seed_history`."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        probes = self.pooled(valid)
        merged = merge_probes(probes)
        adapter = replay(self.sent_adapter(), merged, self._pool, self._lr, self.traits.trains)
        self.seed_history.append(merged)
        contents = [message.content for message in valid]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        metrics["fwdllm-probes"] = len(probes)
        metrics["fwdllm-clients"] = len(valid)
        variance = self.estimate_variance(probes)
        if variance != float("inf"):
            metrics["fwdllm-variance"] = variance
        return to_record(adapter), metrics
