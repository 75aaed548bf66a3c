"""The simulated fleet in the round loop: tiers per client, availability, the clock.

Glue between :mod:`fedtune.devices` (pure tier maths) and the loop: which nodes are
available in a round, each report's simulated seconds and tier, the round policy on
simulated time, and the round's per-tier fields.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from logging import WARNING
from typing import Any

from flwr.common.logger import log

from fedtune.config import Scenario
from fedtune.devices import (
    Tier,
    assign_tiers,
    drops_out,
    is_available,
    load_tiers,
    round_policy,
    simulated_seconds,
)
from fedtune.errors import ConfigError

Judged = list[tuple[dict[str, Any], Any, Any]]
"""(client_update event, reply, decoded update) per sampled client."""


@dataclass
class Fleet:
    """Tier of every client and the seed of every device draw."""

    tiers: dict[str, Tier]
    client_tier: list[str]
    seed: int
    footprints: dict[str, float] = dataclasses.field(default_factory=dict)
    """Peak memory of a training client per engine: the device footprint table's
    figure where it has one (``fedtune/ondevice/footprints.json``), else the largest
    measured in this run (absent until known)."""
    from_table: dict[str, str] = dataclasses.field(default_factory=dict)
    """Engines whose footprint is a phone's (the table's or ``devices.*_mb``) -> where it
    came from: this run's workstation RSS (Ray, Flower, torch) does not replace it."""

    @classmethod
    def from_scenario(cls, scenario: Scenario, population: int) -> Fleet:
        tiers = load_tiers(scenario.devices.profiles)
        names = list(scenario.devices.tiers) or list(tiers)
        unknown = [n for n in names if n not in tiers]
        if unknown:
            raise ConfigError(
                f"'devices.tiers' names {unknown[0]!r}, not in {scenario.devices.profiles} "
                f"(tiers there: {', '.join(tiers)})"
            )
        weights = list(scenario.devices.weights) or [1.0] * len(names)
        if not scenario.devices.tier_ranks:
            tiers = {n: dataclasses.replace(t, lora_rank=0) for n, t in tiers.items()}
        for tier in tiers.values():
            if tier.lora_rank > scenario.lora.r:
                raise ConfigError(
                    f"tier {tier.name!r} has lora_rank = {tier.lora_rank} > lora.r = "
                    f"{scenario.lora.r}: lora.r is the global adapter's rank, the largest"
                )
        table = device_footprints(scenario)
        return cls(
            tiers,
            assign_tiers(population, names, weights),
            scenario.run.seed,
            {engine: mib for engine, (mib, _) in table.items()},
            {engine: source for engine, (_, source) in table.items()},
        )

    def tier_of(self, client: int) -> Tier:
        return self.tiers[self.client_tier[client]]

    def rank_of(self, client: int, global_rank: int) -> int:
        """The LoRA rank ``client`` trains: its tier's, or the global rank."""
        return self.tier_of(client).lora_rank or global_rank

    def mixed_ranks(self, global_rank: int) -> dict[str, int]:
        """Tiers in use whose rank differs from ``global_rank``, with their rank."""
        return {
            name: tier.lora_rank
            for name, tier in self.tiers.items()
            if name in set(self.client_tier) and tier.lora_rank not in (0, global_rank)
        }

    def available_nodes(self, grid: Any, rnd: int, needed: int) -> set[int] | None:
        """Nodes whose device is available this round.

        None (every node) when fewer than ``needed`` are: Flower's sampling would wait
        forever for more nodes than the grid lists.
        """
        grid.available = None
        up = set()
        for node in grid.get_node_ids():
            client = grid.client_index(node)
            if is_available(self.tier_of(client), self.seed, rnd, client):
                up.add(node)
        if len(up) < needed:
            log(
                WARNING,
                "Round %d: only %d devices available, %d needed; ignoring availability",
                rnd,
                len(up),
                needed,
            )
            return None
        return up

    def engine_for(self, client: int, fallback: str = "zeroth") -> str:
        """``client.engine = "auto"``: backprop where the device holds backprop's measured
        footprint (or while it is unknown), ``fallback`` (``client.auto_fallback``:
        zeroth-order steps or forward probes) where it does not."""
        need = self.footprints.get("backprop", 0.0)
        return "backprop" if self.tier_of(client).memory_mb >= need else fallback

    def split_unfit(
        self, messages: list[Any], grid: Any, engine_of: Callable[[Any], str]
    ) -> tuple[list[Any], list[Any]]:
        """Messages to devices that can hold the training, and (message, reason) for the
        rest. A footprint is the largest client peak memory measured so far in this run
        for the message's engine (peak RSS during training), so nothing is refused before
        the first reports."""
        keep, unfit = [], []
        for message in messages:
            tier = self.tier_of(grid.client_index(message.metadata.dst_node_id))
            engine = engine_of(message)
            need = self.footprints.get(engine, 0.0)
            if need and tier.memory_mb < need:
                reason = (
                    f"does not fit: {engine} training needs ~{need:.0f} MB"
                    f"{f' ({self.from_table[engine]})' if engine in self.from_table else ''}, "
                    f"{tier.name} has {tier.memory_mb:.0f} MB"
                )
                unfit.append((message, reason))
            else:
                keep.append(message)
        return keep, unfit

    def apply(self, judged: Judged, scenario: Scenario, rnd: int, keep: int | None = None) -> None:
        """Tier, simulated seconds, dropouts, stragglers and surplus (beyond ``keep``,
        default ``round.clients_per_round``), in place."""
        reports = []
        for event, _, _ in judged:
            tier = self.tier_of(event["client"])
            event["tier"] = tier.name
            if event["status"] != "ok":
                continue
            if event.get("peak_rss_mb") and event["engine"] not in self.from_table:
                engine = event["engine"]
                self.footprints[engine] = max(
                    self.footprints.get(engine, 0.0), float(event["peak_rss_mb"])
                )
            event["simulated_seconds"] = simulated_seconds(
                tier, event["bytes_down"], event["bytes_up"], float(event["compute_seconds"])
            )
            if drops_out(tier, self.seed, rnd, event["client"]):
                event.update(status="dropped", reason=f"dropped out mid-round ({tier.name})")
                continue
            reports.append((event["client"], event["simulated_seconds"]))
        _, discarded = round_policy(
            reports, scenario.round.deadline_s, keep or scenario.round.clients_per_round
        )
        for event, _, _ in judged:
            if event["client"] in discarded and event["status"] == "ok":
                event.update(status="dropped", reason=discarded[event["client"]])

    def round_fields(self, judged: Judged, scenario: Scenario) -> dict[str, Any]:
        """Simulated duration and per-tier participation of a round."""
        kept = [e for e, _, _ in judged if e["status"] == "ok"]
        # The round ends with its last kept report when the quorum filled; otherwise
        # the server waited until the deadline.
        if len(kept) >= scenario.round.clients_per_round:
            duration = max(e["simulated_seconds"] for e in kept)
        else:
            duration = scenario.round.deadline_s
        return {
            "simulated_seconds": duration,
            "participants_by_tier": dict(sorted(Counter(e["tier"] for e in kept).items())),
            "sampled_by_tier": dict(sorted(Counter(e["tier"] for e, _, _ in judged).items())),
        }


def device_footprints(scenario: Scenario) -> dict[str, tuple[float, str]]:
    """Per engine, the device client's measured peak MiB for this scenario's model,
    LoRA, quantization and batch: ``devices.backprop_mb`` / ``inference_mb`` where set,
    else the shipped footprint table (engines it lacks are left out). ``forward``
    runs on phones only as FwdLLM's probes, on the inference graph ``zeroth`` uses.
    Each with where it came from."""
    from fedtune.ondevice import footprint

    given = {"backprop": scenario.devices.backprop_mb, "zeroth": scenario.devices.inference_mb}
    setting = {"backprop": "devices.backprop_mb", "zeroth": "devices.inference_mb"}
    found: dict[str, tuple[float, str]] = {}
    for engine in ("backprop", "zeroth", "forward"):
        graph = "zeroth" if engine == "forward" else engine
        if given[graph]:
            found[engine] = (given[graph], setting[graph])
            continue
        mib = footprint.lookup(
            scenario.model.name,
            graph,
            scenario.model.quantization,
            scenario.lora.r,
            scenario.lora.targets,
            scenario.client.batch_size,
            scenario.client.seq_len,
        )
        if mib is not None:
            found[engine] = (mib, "device footprint table")
    return found


def keep_first_arrivals(judged: Judged, arrival: dict[int, float], keep: int) -> None:
    """Without a fleet: of valid reports, keep the first ``keep`` by real arrival."""
    reports = [
        (e["client"], arrival.get(e["node"], 0.0)) for e, _, _ in judged if e["status"] == "ok"
    ]
    _, discarded = round_policy(reports, float("inf"), keep)
    for event, _, _ in judged:
        if event["client"] in discarded:
            event.update(status="dropped", reason=discarded[event["client"]])
    if discarded:
        log(WARNING, "Over-selection: %d surplus reports discarded", len(discarded))
