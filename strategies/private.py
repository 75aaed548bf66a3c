"""Privacy around any Flower strategy: user-level DP (central or local) and secure aggregation.

DP-FedAvg: H. Brendan McMahan, Daniel Ramage, Kunal Talwar and Li Zhang, "Learning
Differentially Private Recurrent Language Models", ICLR 2018 (arXiv:1710.06963);
adaptive clipping: Galen Andrew et al., NeurIPS 2021 (arXiv:1905.03871); SecAgg+: James
Henry Bell et al., CCS 2020. See ``docs/privacy.md``.

A wrapper, as Flower's own DP strategies are, but the inner strategy never sees one
client's update. Each round :class:`PrivateAggregation` keeps the adapter it sent and
the LoRA factors clients train (the inner strategy's traits: FFA-LoRA trains only B). From the
replies it forms the sum of the clipped updates — clipping each on the server, or,
under secure aggregation, receiving only the sum of updates the clients clipped and
masked — adds ``N(0, (sigma C)^2)`` to that sum (``mode = "central"``) and divides by
``round.clients_per_round``. The inner strategy then receives a single reply: the adapter
sent plus that private mean, with weight 1. FedAvg returns it as is; FFA-LoRA takes its
B and keeps A exactly as sent (no noise ever lands on A); FedAdam and FedYogi take a
server step from it. Whatever the strategy computes is post-processing of the DP release.

``mode = "local"``: clients clip and noise their own updates (:mod:`fedtune.privacy.mod`);
the inner strategy aggregates those replies as usual.

Before a round's messages leave, the wrapper asks its accountant what ε the round would
bring the run to; above ``privacy.max_epsilon`` it raises Flower's
``PrivacyBudgetExhausted`` — before any client trains, let alone any aggregation — and the
round loop ends the run cleanly.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from fedtune.checkpoint import restore_strategy_state, strategy_state
from fedtune.config import Scenario
from fedtune.engines.seeds import trained_keys
from fedtune.privacy.accounting import SAMPLING, Accountant
from fedtune.privacy.clipping import (
    Update,
    add,
    add_noise,
    clip,
    difference,
    next_clip,
    secret_generator,
)
from fedtune.privacy.secagg import RECORD, SecAggRound, masked_vectors, share_keys
from fedtune.protocol import (
    ARRAYS_KEY,
    CLIP_KEY,
    METRICS_KEY,
    NOISE_KEY,
    WEIGHT_KEY,
    StrategyTraits,
    traits_of,
)
from fedtune.wire import from_record, recorddict_nbytes, to_record


@dataclass(frozen=True)
class AdaptiveClipping:
    """Andrew et al.'s adaptive bound: its target quantile, step size and count noise."""

    target_quantile: float
    lr: float
    count_std: float


@dataclass(frozen=True)
class SecureAggregation:
    """SecAgg+ settings: neighbours per client (0: all) and the share threshold."""

    neighbours: int
    threshold: float


class PrivateAggregation(Strategy):
    """Central or local DP and/or secure aggregation around a Flower ``strategy``.

    Parameters
    ----------
    strategy : Strategy
        The inner strategy; it receives the private mean as its only reply (central DP,
        secure aggregation) or the clients' locally privatised replies (local DP).
    mode : str
        ``"central"``, ``"local"`` or ``"none"`` (secure aggregation without DP).
    clip : float
        L2 bound of one client's update (the first bound when ``adaptive`` is set).
    mean_over : int
        Fixed denominator of the central mean: the clients expected per round.
    noise_multiplier, delta, max_epsilon : float
        Noise standard deviation over ``clip``; δ of the reported ε; the budget
        (0: none).
    population, sample_size : int
        Clients that could be sampled, clients sampled per round (for the summary).
    adaptive, secure : AdaptiveClipping or None, SecureAggregation or None
    timeout : float
        Seconds to wait for the replies of each secure-aggregation stage.
    seed : int
        Seeds the (public) neighbour graph of secure aggregation; never the noise.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        mode: str,
        clip: float,
        mean_over: int,
        noise_multiplier: float = 0.0,
        delta: float = 1e-5,
        max_epsilon: float = 0.0,
        population: int = 0,
        sample_size: int = 0,
        adaptive: AdaptiveClipping | None = None,
        secure: SecureAggregation | None = None,
        timeout: float = 600.0,
        seed: int = 0,
    ) -> None:
        self.strategy = strategy
        self.mode = mode
        self.clip = clip
        self.mean_over = mean_over
        self.noise_multiplier = noise_multiplier
        self.update_noise = noise_multiplier
        if adaptive is not None and mode == "central":  # the count takes a share (Andrew et al.)
            _, self.update_noise = compute_adaptive_noise_params(
                noise_multiplier, mean_over, adaptive.count_std
            )
        self.delta, self.max_epsilon = delta, max_epsilon
        self.population, self.sample_size = population, sample_size
        self.adaptive, self.secure = adaptive, secure
        self.timeout, self.seed = timeout, seed
        self.accountant = (
            Accountant(noise_multiplier, delta, local=mode == "local") if mode != "none" else None
        )
        self.refused_round: int | None = None
        # This round's: what was sent, which keys are trained, the accounting event.
        self.sent: Update = {}
        self.keys: list[str] = []
        self.instruction: Message | None = None
        self.pending: tuple[int, int, list[int]] = (0, 0, [])
        self.grid: Grid | None = None
        self.secagg: SecAggRound | None = None
        self.secagg_bytes, self.secagg_seconds = 0, 0.0

    @property
    def traits(self) -> StrategyTraits:
        """The inner strategy's: the wrapper changes how replies are summed, not what
        clients are asked."""
        return traits_of(self.strategy)

    # -- training ------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's messages, after the budget check (and key sharing)."""
        self.grid, self.secagg_bytes, self.secagg_seconds = grid, 0, 0.0
        eligible = len(list(grid.get_node_ids()))
        if self.mode == "local" or self.secure is not None:
            config[CLIP_KEY] = self.clip  # the client clips (it alone sees its update)
        if self.mode == "local":
            config[NOISE_KEY] = self.noise_multiplier
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        self.sent = from_record(arrays)
        self.keys = trained_keys(self.sent, self.traits.trains)
        self.instruction = messages[0]
        clients = [_client_of(grid, m.metadata.dst_node_id) for m in messages]
        self.pending = (eligible, len(messages), clients)
        if self.accountant is not None and self.max_epsilon > 0:
            epsilon = self.accountant.epsilon((eligible, len(messages)), clients)
            if epsilon > self.max_epsilon:
                self.refused_round = server_round
                raise PrivacyBudgetExhausted(
                    f"round {server_round} would bring epsilon to {epsilon:.3f} > "
                    f"privacy.max_epsilon = {self.max_epsilon}"
                )
        if self.mode == "local":  # each client releases its noised update when it replies
            self._spend()
        if self.secure is not None:
            messages = self._share_keys(server_round, messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's aggregate of the private mean (or of local-DP replies)."""
        replies = list(replies)
        if not replies or self.instruction is None:
            return None, None
        if self.mode == "local":
            return self.strategy.aggregate_train(server_round, replies)
        summed = (
            self._secure_sum(replies) if self.secure is not None else self._clipped_sum(replies)
        )
        if summed is None:
            return None, None
        total, unclipped = summed
        denominator = len(replies)
        if self.mode == "central":
            generator = secret_generator()
            total = add_noise(total, self.update_noise * self.clip, generator)
            denominator = self.mean_over
            self._spend()
            if self.adaptive is not None:  # the bound of the next round, from a noisy count
                noisy = unclipped + self.adaptive.count_std * float(generator.normal((1,))[0])
                self.clip = next_clip(
                    self.clip,
                    noisy / self.mean_over,
                    self.adaptive.target_quantile,
                    self.adaptive.lr,
                )
        adapter = {**self.sent, **{k: self.sent[k] + total[k] / denominator for k in self.keys}}
        arrays_key = getattr(self.strategy, "arrayrecord_key", ARRAYS_KEY)
        weight_key = getattr(self.strategy, "weighted_by_key", WEIGHT_KEY)
        content = RecordDict(
            {arrays_key: to_record(adapter), METRICS_KEY: MetricRecord({weight_key: 1})}
        )
        return self.strategy.aggregate_train(
            server_round, [Message(content, reply_to=self.instruction)]
        )

    def _clipped_sum(self, replies: list[Message]) -> tuple[Update, int]:
        """Server-side clipping: the sum of the clipped updates and how many were within."""
        arrays_key = getattr(self.strategy, "arrayrecord_key", ARRAYS_KEY)
        clipped = [
            clip(
                difference(from_record(r.content.array_records[arrays_key]), self.sent, self.keys),
                self.clip,
            )
            for r in replies
        ]
        return add([update for update, _ in clipped]), sum(within for _, within in clipped)

    def _share_keys(self, server_round: int, messages: list[Message]) -> list[Message]:
        """Stages ``keys`` and ``shares``; the train messages of the nodes that finished them."""
        assert self.secure is not None
        started = time.perf_counter()
        nodes = [m.metadata.dst_node_id for m in messages]
        rng = np.random.default_rng([self.seed, server_round, 0x5EC])
        self.secagg = share_keys(
            server_round, nodes, self.secure.neighbours, self.secure.threshold, self._send, rng
        )
        kept = [
            _with_record(m, RECORD, self.secagg.train_record(m.metadata.dst_node_id, self.clip))
            for m in messages
            if m.metadata.dst_node_id in self.secagg.forwarded
        ]
        if len(kept) < len(messages):
            log(
                WARNING,
                "Secure aggregation: %d of %d nodes did not share keys",
                len(messages) - len(kept),
                len(messages),
            )
        self.secagg_seconds += time.perf_counter() - started
        return kept

    def _secure_sum(self, replies: list[Message]) -> tuple[Update, int] | None:
        """The unmasked sum of the masked replies (stage ``unmask``)."""
        assert self.secagg is not None
        started = time.perf_counter()
        arrays_key = getattr(self.strategy, "arrayrecord_key", ARRAYS_KEY)
        masked = {
            r.metadata.src_node_id: masked_vectors(r.content, arrays_key, METRICS_KEY)
            for r in replies
        }
        vectors = self.secagg.unmask(masked, self.clip, self._send)
        self.secagg_seconds += time.perf_counter() - started
        if vectors is None:
            log(WARNING, "Secure aggregation: too few shares to unmask the sum; round abandoned")
            return None
        names = sorted(self.sent)
        total = {
            k: torch.from_numpy(v).to(torch.float32)
            for k, v in zip(names, vectors[:-1], strict=True)
            if k in self.keys
        }
        return total, int(round(float(vectors[-1][0])))

    def _send(self, messages: list[Message]) -> dict[int, Message]:
        assert self.grid is not None
        self.secagg_bytes += sum(recorddict_nbytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        good = {r.metadata.src_node_id: r for r in replies if not r.has_error()}
        self.secagg_bytes += sum(recorddict_nbytes(r.content) for r in good.values())
        for reply in replies:
            if reply.has_error():
                log(
                    WARNING,
                    "Secure aggregation: node %d: %s",
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
        return good

    def _spend(self) -> None:
        assert self.accountant is not None
        self.accountant.spend(*self.pending)

    # -- reporting and state --------------------------------------------------------
    def round_fields(self) -> dict[str, Any]:
        """What a round event reports: ε so far, the next bound, secure-aggregation costs."""
        fields: dict[str, Any] = {}
        if self.accountant is not None:
            fields["epsilon"] = self.accountant.epsilon()
        if self.adaptive is not None:
            fields["clip"] = self.clip
        if self.secure is not None:
            fields.update(secagg_bytes=self.secagg_bytes, secagg_seconds=self.secagg_seconds)
        return fields

    def privacy_summary(self) -> dict[str, Any]:
        """The ``privacy`` block of ``summary.json``."""
        summary: dict[str, Any] = {"mode": self.mode, "secure_aggregation": self.secure is not None}
        if self.accountant is not None:
            summary.update(
                epsilon=self.accountant.epsilon(),
                delta=self.delta,
                noise_multiplier=self.noise_multiplier,
                clip=self.clip,
                sampling=SAMPLING,
                sampling_rate=self.sample_size / self.population if self.population else None,
                population=self.population,
                sample_size=self.sample_size,
                rounds=self.accountant.released,
                max_epsilon=self.max_epsilon,
                refused_round=self.refused_round,
            )
        return summary

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": strategy_state(self.strategy),
            "clip": self.clip,
            "accountant": self.accountant.state_dict() if self.accountant is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_strategy_state(self.strategy, state["strategy"])
        self.clip = float(state["clip"])
        if self.accountant is not None:
            self.accountant.load_state_dict(state["accountant"])

    # -- delegated ------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log(INFO, "\t├──> Privacy: %s", self.privacy_summary())
        self.strategy.summary()


def _client_of(grid: Grid, node: int) -> int:
    """The client a node serves (fedtune's DeviceGrid knows it), else the node id."""
    index = getattr(grid, "client_index", None)
    return int(index(node)) if index is not None else node


def _with_record(message: Message, key: str, record: ConfigRecord) -> Message:
    """``message`` with one more record (a new content: the strategy's messages share one)."""
    content = RecordDict(dict(message.content.items()))
    content[key] = record
    return Message(
        content=content,
        message_type=message.metadata.message_type,
        dst_node_id=message.metadata.dst_node_id,
        group_id=message.metadata.group_id,
    )


def wrap_private(
    strategy: Strategy, scenario: Scenario, population: int
) -> PrivateAggregation | None:
    """``strategy`` wrapped as ``[privacy]`` asks (None when it asks for nothing).

    Settings that contradict another section are refused before, by
    :func:`fedtune.checks.check_federation`.
    """
    privacy = scenario.privacy
    if privacy.mode == "none" and not privacy.secure_aggregation:
        return None
    adaptive = None
    if privacy.adaptive:
        count_std = privacy.count_noise or scenario.round.clients_per_round / 20
        adaptive = AdaptiveClipping(privacy.target_quantile, privacy.clip_lr, count_std)
    secure = (
        SecureAggregation(privacy.secagg_neighbours, privacy.secagg_threshold)
        if privacy.secure_aggregation
        else None
    )
    return PrivateAggregation(
        strategy,
        mode=privacy.mode,
        clip=privacy.clip,
        mean_over=scenario.round.clients_per_round,
        noise_multiplier=privacy.noise_multiplier,
        delta=privacy.target_delta,
        max_epsilon=privacy.max_epsilon,
        population=population,
        sample_size=scenario.round.sampled,
        adaptive=adaptive,
        secure=secure,
        timeout=scenario.round.timeout_s if scenario.devices.enabled else scenario.round.deadline_s,
        seed=scenario.run.seed,
    )
