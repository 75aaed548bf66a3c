"""The round loop, top to bottom: sample, send, validate, aggregate, evaluate, record.

Flower's ``Strategy.start`` runs a loop of its own, but it cannot validate replies
before aggregation (one inconsistent reply ends a run), has no deadline policy and
always starts at round 1. fedtune keeps Flower's strategy API — ``configure_train``
and ``aggregate_train`` of any :class:`~flwr.serverapp.strategy.Strategy` — and owns
the loop around it.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fedtune.attacks import attackers
from fedtune.checkpoint import Checkpoint, restore_strategy_state, save_checkpoint, strategy_state
from fedtune.config import Scenario, client_spec
from fedtune.data import build_population, eval_chunks
from fedtune.errors import ConfigError
from fedtune.evaluation import perplexity
from fedtune.metrics import (
    EventLog,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    peak_rss_mb,
    read_events,
)
from fedtune.models import (
    adapter_state,
    attach_lora,
    load_adapter_state,
    load_base_model,
    load_tokenizer,
    save_adapter,
)
from fedtune.privacy.strategy import wrap_private
from fedtune.report import plot_perplexity
from fedtune.server.fleet import Fleet, keep_first_arrivals
from fedtune.server.grid import DeviceGrid
from fedtune.server.seed_sync import SEED_ENGINES, SeedSync
from fedtune.strategies import build_strategy
from fedtune.strategies.lora_math import truncate
from fedtune.strategies.ranks import RANK_KEY, require_mixed_ranks
from fedtune.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    ENGINE_KEY,
    check_update,
    expected_specs,
    from_record,
    metric,
    recorddict_nbytes,
    to_record,
)

MAX_UPDATE_FACTOR = 4
"""An update may be at most this many times the size of the adapter sent."""
DISCOVERY_TIMEOUT_S = 120.0


class Observer:
    """Hooks for progress displays; every method is optional."""

    def run_started(self, scenario: Scenario, initial_perplexity: float) -> None: ...

    def round_started(self, rnd: int, sampled: int) -> None: ...

    def client_done(self, rnd: int, event: dict[str, Any]) -> None: ...

    def round_ended(self, event: dict[str, Any]) -> None: ...


@dataclass
class RoundTally:
    """What one round's replies came to."""

    accepted: list[tuple[int, Message]] = field(default_factory=list)
    rejected: int = 0
    dropped: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    losses: list[float] = field(default_factory=list)


@contextlib.contextmanager
def seeded_global_random(seed: int, rnd: int) -> Iterator[None]:
    """Seed Python's ``random`` for one ``configure_train`` call, then restore it.

    Flower's strategies sample nodes with the global ``random`` module; seeding it
    here (and listing nodes in client order, see DeviceGrid) makes sampling a
    function of (seed, round) for every Flower strategy, built-in or plug-in.
    """
    saved = random.getstate()
    random.seed(int(np.random.SeedSequence([seed, rnd, 0x5A]).generate_state(1)[0]))
    try:
        yield
    finally:
        random.setstate(saved)


def aggregate_in_client_order(strategy: Any, rnd: int, accepted: list[tuple[int, Message]]) -> Any:
    """``strategy.aggregate_train`` over replies sorted by client index.

    Floating-point sums depend on their order; sorting makes the aggregate independent
    of the order in which replies arrived.
    """
    ordered = [message for _, message in sorted(accepted, key=lambda pair: pair[0])]
    arrays, _ = strategy.aggregate_train(rnd, ordered)
    return arrays


def with_rank(message: Message, strategy: Any, rank: int) -> Message:
    """``message`` for a client that trains at LoRA ``rank``: the strategy's
    ``download`` of the adapter and ``"lora-rank"`` in the config (a new content: the
    strategy's messages share one)."""
    content = RecordDict(dict(message.content.items()))
    key = next(iter(message.content.array_records))
    content[key] = strategy.download(message.content.array_records[key], rank)
    content[CONFIG_KEY] = ConfigRecord(
        {**message.content.config_records[CONFIG_KEY], RANK_KEY: rank}
    )
    return Message(
        content=content,
        message_type=message.metadata.message_type,
        dst_node_id=message.metadata.dst_node_id,
    )


def run_federation(
    grid: Grid,
    scenario: Scenario,
    run_dir: Path,
    observer: Observer | None = None,
    expected_nodes: int | None = None,
    resume: Checkpoint | None = None,
) -> dict[str, Any]:
    """Run every round of ``scenario`` on ``grid``; write the run folder; return the summary.

    With ``resume``, start after the checkpoint's round from its state; events of later
    rounds (written before the crash, after the checkpoint) are dropped first.
    """
    observer = observer or Observer()
    started = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "scenario.toml", scenario.to_toml())
    if resume is not None:
        _truncate_events(run_dir / "metrics.jsonl", resume.round)

    # Server-side state: the global adapter, the model that evaluates it, the strategy.
    population = build_population(scenario.data)
    tokenizer = load_tokenizer(scenario.model.name)
    held_out = eval_chunks(tokenizer, population, scenario.data, scenario.client.seq_len)
    base = load_base_model(
        scenario.model.name,
        scenario.model.compute_dtype,
        scenario.model.num_layers,
        scenario.model.quantization,
    )
    model = attach_lora(base, scenario.lora, seed=scenario.run.seed)
    state = adapter_state(model)
    specs = expected_specs(state)
    max_bytes = MAX_UPDATE_FACTOR * sum(v.numel() * 4 for v in state.values())
    strategy = build_strategy(
        scenario.strategy.name,
        dict(scenario.strategy.params),
        population=len(population.train),
        clients_per_round=scenario.round.sampled,
    )
    fleet = (
        Fleet.from_scenario(scenario, len(population.train)) if scenario.devices.enabled else None
    )
    attacking = attackers(len(population.train), scenario.attack, scenario.run.seed)
    global_rank = scenario.lora.r
    mixed = fleet.mixed_ranks(global_rank) if fleet is not None else {}
    require_mixed_ranks(strategy, scenario.strategy.name, mixed, global_rank)
    private = wrap_private(strategy, scenario, len(population.train))  # None without [privacy]
    strategy = private or strategy
    engine_setting = scenario.client.engine
    if mixed and engine_setting in (*SEED_ENGINES, "auto"):
        raise ConfigError(
            f"client.engine = {engine_setting!r} replays seed steps on the adapter sent: "
            f"it cannot train the mixed LoRA ranks of tiers {', '.join(sorted(mixed))}"
        )
    seeds = SeedSync(
        scenario.run.seed,
        scenario.client.num_seeds,
        scenario.client.lr,
        scenario.client.local_steps,
    )

    def choose_engine(client: int) -> str:
        return fleet.engine_for(client) if engine_setting == "auto" else engine_setting

    def engine_of(message: Message) -> str:
        """The engine a message's client trains with (chosen per tier under ``auto``)."""
        return str(message.content.config_records[CONFIG_KEY].get(ENGINE_KEY, engine_setting))

    def rank_of(message: Message) -> int:
        if not mixed:
            return global_rank
        return fleet.rank_of(device_grid.client_index(message.metadata.dst_node_id), global_rank)

    device_grid = DeviceGrid(grid)
    device_grid.discover(
        expected=expected_nodes or len(population.train),
        population=len(population.train),
        timeout=DISCOVERY_TIMEOUT_S,
    )

    events = EventLog(run_dir / "metrics.jsonl")
    totals = {"bytes_up": 0, "bytes_down": 0, "rejected": 0, "dropped": 0, "simulated_seconds": 0.0}
    if resume is None:
        initial = perplexity(model, held_out, scenario.run.eval_batch_size)
        events.write("round", round=0, perplexity=initial, participants=0, wall_seconds=0.0)
        current, completed, first_round = initial, 0, 1
    else:
        state = {k: v.clone() for k, v in resume.adapter.items()}
        load_adapter_state(model, state)
        restore_strategy_state(strategy, resume.strategy)
        history = resume.history
        initial, current = history["initial_perplexity"], history["current_perplexity"]
        completed, first_round = history["rounds_completed"], resume.round + 1
        totals.update({k: history.get(k, 0) for k in totals})
        started -= history.get("wall_seconds", 0.0)  # wall time counts the earlier session(s)
        if fleet is not None:
            fleet.footprints = dict(history.get("footprints", {}))
        log(INFO, "Resuming after round %d (perplexity %.3f)", resume.round, current)

    def checkpoint(rnd: int) -> None:
        history = {
            "initial_perplexity": initial,
            "current_perplexity": current,
            "rounds_completed": completed,
            **totals,
            "wall_seconds": time.perf_counter() - started,
            "footprints": fleet.footprints if fleet is not None else {},
        }
        save_checkpoint(
            run_dir / "checkpoints",
            Checkpoint(
                rnd,
                scenario.name,
                scenario.to_toml(),
                scenario.digest(),
                state,
                strategy_state(strategy),
                history,
            ),
            keep=scenario.run.keep_checkpoints,
        )

    if resume is None:
        checkpoint(0)
    observer.run_started(scenario, initial)
    log(INFO, "Held-out perplexity before round 1: %.3f", initial)

    def new_event(sent: Message, rnd: int, bytes_down: int) -> dict[str, Any]:
        """The fields every client_update event of a sent message has."""
        node = sent.metadata.dst_node_id
        client = device_grid.client_index(node)
        return {
            "round": rnd,
            "node": node,
            "client": client,
            "engine": engine_of(sent),
            "bytes_down": bytes_down,
            **({"attacker": client in attacking} if attacking else {}),
            **({"lora_rank": rank_of(sent)} if mixed else {}),
        }

    for rnd in range(first_round, scenario.run.rounds + 1):
        round_started = time.perf_counter()
        config = ConfigRecord({**client_spec(scenario), "round": rnd})
        if fleet is not None:
            device_grid.available = fleet.available_nodes(device_grid, rnd, scenario.round.sampled)
        try:
            with seeded_global_random(scenario.run.seed, rnd):
                messages = list(
                    strategy.configure_train(rnd, to_record(state), config, device_grid)
                )
        except PrivacyBudgetExhausted as exc:  # refused before any client trains
            log(INFO, "Round %d refused, the run ends: %s", rnd, exc)
            break
        if mixed:
            messages = [
                m if rank_of(m) == global_rank else with_rank(m, strategy, rank_of(m))
                for m in messages
            ]
        messages = [
            seeds.send(m, client, choose_engine(client), state, strategy)
            for m in messages
            for client in [device_grid.client_index(m.metadata.dst_node_id)]
        ]
        observer.round_started(rnd, len(messages))

        tally = RoundTally()
        down = {id(m.content): recorddict_nbytes(m.content) for m in messages}
        wait = scenario.round.timeout_s if fleet is not None else scenario.round.deadline_s
        judged: list[tuple[dict[str, Any], Message | None, Any]] = []
        if fleet is not None:  # a device whose memory cannot hold the training is not sent work
            messages, unfit = fleet.split_unfit(messages, device_grid, engine_of)
            for sent, reason in unfit:
                event = new_event(sent, rnd, 0)
                event.update(bytes_up=0, status="dropped", reason=reason)
                judged.append((event, None, None))
        replies = device_grid.collect(messages, wait)
        for sent, reply in zip(messages, replies, strict=True):
            event = new_event(sent, rnd, down[id(sent.content)])
            update = None
            if reply is None:
                event.update(status="dropped", reason=f"no reply within {wait} s", bytes_up=0)
            else:
                event["bytes_up"] = recorddict_nbytes(reply.content) if not reply.has_error() else 0
                for key, name in (
                    ("loss", "loss"),
                    ("num-examples", "num_examples"),
                    ("compute-seconds", "compute_seconds"),
                    ("cpu-seconds", "cpu_seconds"),
                    ("peak-rss-mb", "peak_rss_mb"),
                ):
                    event[name] = metric(reply, key)
                rank = rank_of(sent)
                expected = specs if rank == global_rank else expected_specs(truncate(state, rank))
                if engine_of(sent) in SEED_ENGINES:  # seed steps, replayed on the adapter sent
                    client_index = device_grid.client_index(sent.metadata.dst_node_id)
                    update, steps, reason = seeds.receive(sent, reply, client_index, state)
                    if update is not None:
                        seeds.for_strategy(reply, steps)
                else:
                    update, reason = check_update(
                        reply, expected, max_bytes, scenario.client.wire_dtype
                    )
                if update is not None and metric(reply, "round") != rnd:
                    update, reason = None, f"stale round {metric(reply, 'round')!r} (now {rnd})"
                if update is None:
                    event.update(status="rejected", reason=reason)
                else:
                    event["status"] = "ok"
            judged.append((event, reply, update))

        # The round policy: device dropouts, then stragglers past the deadline and
        # surplus over-selected reports, on simulated time (or on arrival time).
        if fleet is not None:
            fleet.apply(judged, scenario, rnd)
        else:
            keep_first_arrivals(judged, device_grid.arrival, scenario.round.clients_per_round)

        for event, reply, update in judged:
            tally.bytes_down += event["bytes_down"]
            tally.bytes_up += event["bytes_up"]
            if event["status"] == "ok":
                # Strategies aggregate what was validated: the decoded fp32 update.
                reply.content[ARRAYS_KEY] = to_record(update)
                tally.accepted.append((event["client"], reply))
                tally.losses.append(float(event["loss"]))
                if scenario.run.save_updates:
                    _save_update(run_dir, rnd, event["client"], update, event["num_examples"])
            elif event["status"] == "rejected":
                tally.rejected += 1
            else:
                tally.dropped += 1
            events.write("client_update", **event)
            observer.client_done(rnd, event)

        status = "ok"
        accepted = tally.accepted
        if len(accepted) < scenario.round.min_reports:
            status = "abandoned"
            log(
                INFO,
                "Round %d abandoned: %d valid updates < round.min_reports = %d",
                rnd,
                len(accepted),
                scenario.round.min_reports,
            )
        else:
            arrays = aggregate_in_client_order(strategy, rnd, accepted)
            if arrays is None:
                status = "abandoned"
            else:
                state = from_record(arrays)
                load_adapter_state(model, state)
                current = perplexity(model, held_out, scenario.run.eval_batch_size)
                completed = rnd

        for key in ("bytes_up", "bytes_down", "rejected", "dropped"):
            totals[key] += getattr(tally, key)
        round_event = events.write(
            "round",
            round=rnd,
            status=status,
            perplexity=current,
            participants=len(accepted),
            sampled=len(messages),
            rejected=tally.rejected,
            dropped=tally.dropped,
            train_loss=(sum(tally.losses) / len(tally.losses)) if tally.losses else None,
            bytes_up=tally.bytes_up,
            bytes_down=tally.bytes_down,
            wall_seconds=time.perf_counter() - round_started,
            server_peak_rss_mb=peak_rss_mb(),
            **(fleet.round_fields(judged, scenario) if fleet is not None else {}),
            **(private.round_fields() if private is not None else {}),
        )
        if fleet is not None:
            totals["simulated_seconds"] += round_event["simulated_seconds"]
        checkpoint(rnd)
        observer.round_ended(round_event)
        log(INFO, "Round %d: perplexity %.3f (%d updates)", rnd, current, len(accepted))

    events.close()
    save_adapter(model, state, run_dir / "adapter")
    plot_perplexity(run_dir)
    summary = {
        "scenario": scenario.name,
        "scenario_digest": scenario.digest(),
        "rounds_completed": completed,
        "rounds": scenario.run.rounds,
        "initial_perplexity": initial,
        "final_perplexity": current,
        "bytes_up": totals["bytes_up"],
        "bytes_down": totals["bytes_down"],
        "clients_rejected": totals["rejected"],
        "clients_dropped": totals["dropped"],
        **({"simulated_seconds": totals["simulated_seconds"]} if fleet is not None else {}),
        "population": len(population.train),
        **({"privacy": private.privacy_summary()} if private is not None else {}),
        "wall_seconds": time.perf_counter() - started,
        "server_peak_rss_mb": peak_rss_mb(),
    }
    # Written last: its presence means the run finished.
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _truncate_events(path: Path, last_round: int) -> None:
    """Keep only events of rounds up to ``last_round`` (rewritten atomically)."""
    if not path.exists():
        return
    import json

    kept = [e for e in read_events(path) if e.get("round", 0) <= last_round]
    atomic_write_text(path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))


def _save_update(run_dir: Path, rnd: int, client: int, state: Any, weight: Any) -> None:
    """Keep one accepted update for audit (``run.save_updates``), written atomically."""
    from safetensors.torch import save

    data = save(state, metadata={"num_examples": str(weight), "round": str(rnd)})
    atomic_write_bytes(
        run_dir / "updates" / f"round-{rnd:05d}" / f"client-{client:05d}.safetensors", data
    )
