"""The run: set up, then the rounds in one visible loop, then the run folder's last files.

Flower's ``Strategy.start`` runs a loop of its own, but it cannot validate replies
before aggregation (one inconsistent reply ends a run), has no deadline policy and
always starts at round 1. fedtune keeps Flower's strategy API — ``configure_train``
and ``aggregate_train`` of any :class:`~flwr.serverapp.strategy.Strategy` — and owns
the loop around it. A round's steps (assign, send, judge, record) are named functions
in :mod:`fedtune.server.round`; what changes from round to round is one
:class:`RunState`, which is also what a checkpoint saves.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Protocol

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fedtune.attacks import attackers
from fedtune.checkpoint import Checkpoint, restore_strategy_state, save_checkpoint, strategy_state
from fedtune.checks import check_federation
from fedtune.config import Scenario, client_spec
from fedtune.data import build_population, eval_chunks
from fedtune.data.partition import write_partition_report
from fedtune.errors import FedtuneError
from fedtune.evaluation import Evaluator, perplexity
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
    load_adapter_state,
    load_lora_model,
    load_tokenizer,
    save_adapter,
)
from fedtune.models.base import HUB_IDS
from fedtune.models.lora import AdapterState
from fedtune.protocol import (
    CONFIG_KEY,
    INFO_KEY,
    WARM_ACTION,
    WARM_SECONDS_KEY,
    TrainInstructions,
    traits_of,
)
from fedtune.report import plot_perplexity
from fedtune.server import round as steps
from fedtune.server.fleet import Fleet
from fedtune.server.grid import POLL_SECONDS, DeviceGrid
from fedtune.server.seed_sync import SeedSync
from fedtune.strategies import build_strategy
from fedtune.strategies.private import wrap_private
from fedtune.tracking import open_trackers
from fedtune.wire import expected_specs, from_record

DISCOVERY_TIMEOUT_S = 120.0
WARM_UP_TIMEOUT_S = 900.0
"""How long round 1 waits for the workers' warm-up (:func:`warm_up`) to be answered."""


def check_discovered(found: int, needed: int) -> None:
    """Refuse a federation with fewer client nodes than a round samples: Flower's
    sampling would wait for them for ever (``flwr run .`` on Flower's default local
    federation, which has 2 simulated SuperNodes, did)."""
    if found < needed:
        raise FedtuneError(
            f"only {found} client node(s) answered within {DISCOVERY_TIMEOUT_S:.0f} s; a round "
            f"samples round.clients_per_round = {needed}. Start more SuperNodes (under `flwr "
            f"run .`, Flower's local federation has 2 unless given --federation-config "
            f"'num-supernodes=N'), or lower round.clients_per_round"
        )


# Kept importable from here: tests and benchmarks drive these directly.
aggregate_in_client_order = steps.aggregate_in_client_order
seeded_global_random = steps.seeded_global_random


class Observer(Protocol):
    """Hooks for progress displays (structural: any object with these methods)."""

    def run_started(self, scenario: Scenario, initial_perplexity: float) -> None: ...

    def round_started(self, rnd: int, sampled: int) -> None: ...

    def client_done(self, rnd: int, event: dict[str, Any]) -> None: ...

    def round_ended(self, event: dict[str, Any]) -> None: ...


class Silent:
    """An observer that shows nothing."""

    def run_started(self, scenario: Scenario, initial_perplexity: float) -> None:
        return None

    def round_started(self, rnd: int, sampled: int) -> None:
        return None

    def client_done(self, rnd: int, event: dict[str, Any]) -> None:
        return None

    def round_ended(self, event: dict[str, Any]) -> None:
        return None


@dataclass
class Totals:
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: int = 0
    dropped: int = 0
    simulated_seconds: float = 0.0


@dataclass
class RunState:
    """Everything that changes between rounds; a checkpoint is this plus the
    scenario."""

    adapter: AdapterState
    """The global adapter."""
    initial_perplexity: float
    current_perplexity: float
    round: int = 0
    """The last round run (0: none yet)."""
    rounds_completed: int = 0
    """The last round whose aggregate was taken."""
    totals: Totals = field(default_factory=Totals)
    wall_seconds: float = 0.0
    """Wall time of the earlier sessions of this run (a resumed run adds its own)."""
    footprints: dict[str, float] = field(default_factory=dict)
    """The simulated fleet's measured peak memory per engine."""
    seed_versions: dict[int, int] = field(default_factory=dict)
    """Client -> the adapter version it holds (seed-step catch-up)."""
    strategy: dict[str, Any] = field(default_factory=dict)
    """The strategy's own state (:func:`fedtune.checkpoint.strategy_state`)."""

    def history(self) -> dict[str, Any]:
        """The plain values a checkpoint keeps besides the adapter and the strategy."""
        return {
            "initial_perplexity": self.initial_perplexity,
            "current_perplexity": self.current_perplexity,
            "rounds_completed": self.rounds_completed,
            **asdict(self.totals),
            "wall_seconds": self.wall_seconds,
            "footprints": dict(self.footprints),
            "seed_versions": {str(k): v for k, v in self.seed_versions.items()},
        }

    def to_checkpoint(self, scenario: Scenario) -> Checkpoint:
        return self.to_checkpoint_of(scenario.name, scenario.to_toml(), scenario.digest())

    def to_checkpoint_of(self, name: str, toml: str, digest: str) -> Checkpoint:
        """The checkpoint of this state for the scenario ``name`` (resolved ``toml``)."""
        return Checkpoint(
            self.round, name, toml, digest, self.adapter, self.strategy, self.history()
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> RunState:
        history = checkpoint.history
        totals = Totals(**{k: history.get(k, 0) for k in asdict(Totals())})
        return cls(
            adapter={k: v.clone() for k, v in checkpoint.adapter.items()},
            initial_perplexity=history["initial_perplexity"],
            current_perplexity=history["current_perplexity"],
            round=checkpoint.round,
            rounds_completed=history["rounds_completed"],
            totals=totals,
            wall_seconds=history.get("wall_seconds", 0.0),
            footprints=dict(history.get("footprints", {})),
            seed_versions={int(k): int(v) for k, v in history.get("seed_versions", {}).items()},
            strategy=checkpoint.strategy,
        )


def run_federation(
    grid: Grid,
    scenario: Scenario,
    run_dir: Path,
    observer: Observer | None = None,
    expected_nodes: int | None = None,
    resume: Checkpoint | None = None,
    known_nodes: Mapping[int, int] | None = None,
    warming: Sequence[str] = (),
    warm_nodes: bool = False,
) -> dict[str, Any]:
    """Run every round of ``scenario`` on ``grid``; write the run folder; return the summary.

    With ``resume``, start after the checkpoint's round from its state; events of later
    rounds (written before the crash, after the checkpoint) are dropped first.
    ``known_nodes`` (node -> client index) are nodes the server need not ask which
    client they are: the simulation engine's own (see :class:`DeviceGrid`).
    ``warming``: ids of :func:`warm_up` queries already sent, whose replies round 1
    waits for once the initial adapter is evaluated. ``warm_nodes`` (``fedtune serve``):
    send the warm-up to every discovered SuperNode (not phones: they have nothing on
    the server side to warm) as discovery ends, and record which answered by round 1
    without waiting for the rest: a SuperNode takes one message at a time, so its round-1
    message runs once its warm-up is done, and a node that died must not delay round 1.
    """
    observer = observer if observer is not None else Silent()
    started = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "scenario.toml", scenario.to_toml())
    if resume is not None:
        _truncate_events(run_dir / "metrics.jsonl", resume.round)

    # What the run fixes: data, the evaluating model, the strategy, the federation.
    population = build_population(scenario.data)
    tokenizer = load_tokenizer(scenario.model.name)
    held_out = eval_chunks(
        tokenizer, population, scenario.data, scenario.client.seq_len, scenario.model.task
    )
    evaluator = Evaluator.build(scenario, tokenizer, population)  # [evaluation]: beyond perplexity
    if resume is None:
        write_partition_report(scenario.data, run_dir)  # row data: partitions.md and .png
    model = load_lora_model(scenario.model, scenario.lora, seed=scenario.run.seed)
    fed = _federation(grid, scenario, adapter_state(model), len(population.train), known_nodes)
    found = fed.grid.discover(
        expected=expected_nodes or len(population.train),
        population=len(population.train),
        timeout=DISCOVERY_TIMEOUT_S,
    )
    check_discovered(len(found), scenario.round.clients_per_round)
    if warm_nodes:  # each SuperNode's worker loads the model while the server evaluates
        flower = [n for n in found if not fed.grid.is_phone(n)]
        warming = [*warming, *send_warm_up(fed.grid, scenario, flower)]

    def evaluate(adapter: AdapterState) -> float:
        load_adapter_state(model, adapter)
        return perplexity(model, held_out, scenario.run.eval_batch_size)

    events = EventLog(run_dir / "metrics.jsonl", open_trackers(scenario, run_dir, resume))
    if resume is None:
        initial = evaluate(adapter_state(model))
        events.write(
            "round",
            round=0,
            perplexity=initial,
            participants=0,
            wall_seconds=0.0,
            **evaluator.scores(model),
        )
        state = RunState(adapter_state(model), initial, initial)
        _save(run_dir, fed, state, started)
    else:
        state = RunState.from_checkpoint(resume)
        load_adapter_state(model, state.adapter)
        restore_strategy_state(fed.strategy, state.strategy)
        started -= state.wall_seconds  # wall time counts the earlier session(s)
        log(
            INFO, "Resuming after round %d (perplexity %.3f)", state.round, state.current_perplexity
        )
    if fed.fleet is not None:  # a fresh run starts from the fleet's (table) footprints
        if resume is None:
            state.footprints = fed.fleet.footprints
        else:
            fed.fleet.footprints = state.footprints
    fed.seeds.held = state.seed_versions
    # Deployed nodes are not waited for (the replies already there are recorded).
    warmed = await_warm_up(fed.grid, list(warming), 0.0 if warm_nodes else WARM_UP_TIMEOUT_S)
    if warmed is not None:
        events.write("warm_up", **warmed)
    observer.run_started(scenario, state.initial_perplexity)
    log(INFO, "Held-out perplexity before round 1: %.3f", state.initial_perplexity)
    spec = client_spec(scenario)
    save_update = _update_saver(run_dir) if scenario.run.save_updates else None

    settings = scenario.round
    for rnd in range(state.round + 1, scenario.run.rounds + 1):
        round_started = time.perf_counter()
        changes = fed.grid.refresh(settings.max_missed, settings.join_wait_s, settings.sampled)
        if changes:  # nodes joined, left, were benched or came back since the last round
            events.write("nodes", round=rnd, live=len(fed.grid.nodes), **changes.fields())
        try:
            sampled = steps.sample(fed, rnd, state.adapter, spec)
        except PrivacyBudgetExhausted as exc:  # refused before any client trains
            log(INFO, "Round %d refused, the run ends: %s", rnd, exc)
            break
        assignments = steps.assign(fed, rnd, sampled, state.adapter)
        observer.round_started(rnd, len(assignments))
        judged = _wave(fed, rnd, assignments, state.adapter)
        extra = _paced_waves(fed, rnd, sampled, assignments, judged, state.adapter, round_started)
        steps.bound_updates(fed, judged, state.adapter)
        steps.apply_round_policy(fed, rnd, judged, len(extra))
        tally = steps.record(fed, rnd, judged, events, observer.client_done, save_update)
        fed.grid.note_answers(steps.answered(judged), settings.max_missed)

        status, why = "abandoned", None
        strategy_metrics: dict[str, Any] = {}
        if len(tally.accepted) < scenario.round.min_reports:
            why = (
                f"{len(tally.accepted)} valid updates < round.min_reports = "
                f"{scenario.round.min_reports}"
            )
        else:
            before = strategy_state(fed.strategy)
            adapter, score, why, strategy_metrics = _aggregate(fed, rnd, tally, evaluate)
            if adapter is None:  # the strategy's state must not keep a bad round either
                restore_strategy_state(fed.strategy, before)
                load_adapter_state(model, state.adapter)
            else:
                status = "ok"
                state.adapter, state.current_perplexity = adapter, score
                state.rounds_completed = rnd
        if why is not None:
            log(WARNING, "Round %d abandoned: %s", rnd, why)

        _add_tally(state.totals, tally)
        round_event = events.write(
            "round",
            round=rnd,
            status=status,
            **({"reason": why} if why is not None else {}),
            perplexity=state.current_perplexity,
            participants=len(tally.accepted),
            sampled=len(assignments) + len(extra),
            rejected=tally.rejected,
            dropped=tally.dropped,
            train_loss=tally.train_loss,
            bytes_up=tally.bytes_up,
            bytes_down=tally.bytes_down,
            wall_seconds=time.perf_counter() - round_started,
            server_peak_rss_mb=peak_rss_mb(),
            **(
                fed.fleet.round_fields([j.as_tuple() for j in judged], scenario)
                if fed.fleet
                else {}
            ),
            **(fed.private.round_fields() if fed.private is not None else {}),
            **({"strategy_metrics": strategy_metrics} if strategy_metrics else {}),
            **(evaluator.scores(model) if status == "ok" else {}),  # model holds the aggregate
        )
        if fed.fleet is not None:
            state.totals.simulated_seconds += round_event["simulated_seconds"]
        state.round = rnd
        _save(run_dir, fed, state, started)
        observer.round_ended(round_event)
        log(
            INFO,
            "Round %d: perplexity %.3f (%d updates)",
            rnd,
            state.current_perplexity,
            len(tally.accepted),
        )

    events.close()
    summary = {
        "scenario": scenario.name,
        "scenario_digest": scenario.digest(),
        "rounds_completed": state.rounds_completed,
        "rounds": scenario.run.rounds,
        "initial_perplexity": state.initial_perplexity,
        "final_perplexity": state.current_perplexity,
        "bytes_up": state.totals.bytes_up,
        "bytes_down": state.totals.bytes_down,
        "clients_rejected": state.totals.rejected,
        "clients_dropped": state.totals.dropped,
        **({"simulated_seconds": state.totals.simulated_seconds} if fed.fleet else {}),
        "population": len(population.train),
        **({"privacy": fed.private.privacy_summary()} if fed.private is not None else {}),
        "wall_seconds": time.perf_counter() - started,
        "server_peak_rss_mb": peak_rss_mb(),
    }
    base_name = HUB_IDS.get(scenario.model.name)
    save_adapter(
        model, state.adapter, run_dir / "adapter", base_name, model_card(scenario, summary)
    )
    plot_perplexity(run_dir)
    # Written last: its presence means the run finished.
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def warm_up(grid: Grid, scenario: Scenario, workers: int) -> list[str]:
    """Send a warm-up query (:data:`~fedtune.protocol.WARM_ACTION`) to ``workers`` of
    the grid's nodes (waiting for them to be listed); return the messages' ids (none for
    0 workers). Their replies are awaited by :func:`run_federation` before round 1.

    In Flower's simulation engine any idle worker (Ray actor) takes the next message,
    so as many queries as workers reach each of them while they are all idle: each
    loads the model, tokenizer and population while the server checks the scenario and
    evaluates the initial adapter, instead of in round 1, where its start (importing
    torch, loading the model) lengthened the round and counted against its deadline."""
    if workers <= 0:
        return []
    deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
    while not (nodes := sorted(grid.get_node_ids())) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    return send_warm_up(grid, scenario, nodes[:workers])


def send_warm_up(grid: Grid, scenario: Scenario, nodes: Sequence[int]) -> list[str]:
    """One warm-up query (:data:`~fedtune.protocol.WARM_ACTION`) to each of ``nodes``:
    load what this scenario's train messages need; the messages' ids."""
    config = TrainInstructions(round=0, spec=client_spec(scenario)).to_config()
    messages = [
        Message(
            RecordDict({CONFIG_KEY: config}),
            dst_node_id=node,
            message_type=f"{MessageType.QUERY}.{WARM_ACTION}",
        )
        for node in nodes
    ]
    return list(grid.push_messages(messages)) if messages else []


def await_warm_up(
    grid: DeviceGrid, ids: list[str], timeout: float = WARM_UP_TIMEOUT_S
) -> dict[str, Any] | None:
    """Wait (up to ``timeout``; 0: take the replies already there) for the replies to
    :func:`warm_up`'s queries; return the ``warm_up`` event's fields (None when none was
    sent). A failed or missing reply is logged and costs nothing else: that worker loads
    at its first train message, as it would without a warm-up. The load time a worker
    reports is recorded, not trusted."""
    if not ids:
        return None
    started = time.monotonic()
    replies, _ = grid.wait_for(ids, timeout)
    waited = time.monotonic() - started
    loads: list[float] = []
    failed = 0
    for reply in replies.values():
        if reply.has_error():
            failed += 1
            log(WARNING, "A worker's warm-up failed: %s", reply.error.reason)
            continue
        info = reply.content.config_records.get(INFO_KEY)
        seconds = info.get(WARM_SECONDS_KEY) if info is not None else None
        if isinstance(seconds, float) and 0 <= seconds < 1e6:
            loads.append(seconds)
    missing = len(ids) - len(replies)
    if missing and timeout <= 0:
        log(INFO, "%d of %d node(s) still warming; their round-1 messages wait", missing, len(ids))
    elif missing:
        log(WARNING, "%d worker(s) not warm after %.0f s; round 1 goes on", missing, timeout)
    else:
        log(INFO, "%d worker(s) warm (waited %.1f s for them)", len(ids), waited)
    return {
        "workers": len(ids),
        "ready": len(replies) - failed,
        "failed": failed,
        "waited_seconds": waited,
        "reported_load_seconds": max(loads) if loads else None,
    }


def model_card(scenario: Scenario, summary: dict[str, Any]) -> str:
    """The adapter folder's README.md: what base it was trained on, how, on what data,
    and what it scored; the resolved scenario follows in full."""
    model, lora, data = scenario.model, scenario.lora, scenario.data
    base = HUB_IDS.get(model.name, model.name)
    source = (
        f"`{base}`, as fedtune loads it: dequantized from the GGUF file of the "
        f"`{model.name}` package"
        if model.name in HUB_IDS
        else f"`{base}`"
    )
    rounds = f"{summary['rounds_completed']} of {summary['rounds']} rounds aggregated"
    return "\n".join(
        [
            "---",
            "library_name: peft",
            f"base_model: {base}",
            "tags: [fedtune, federated-learning, lora]",
            "---",
            "",
            f"# LoRA adapter from the fedtune run `{scenario.name}`",
            "",
            f"- Base model: {source} (compute dtype {model.compute_dtype}, "
            f"frozen base quantization `{model.quantization}`).",
            f"- LoRA: rank {lora.r}, alpha {lora.alpha}, on {', '.join(lora.targets)}.",
            f"- Federation: strategy `{scenario.strategy.name}`, engine "
            f"`{scenario.client.engine}`, {summary['population']} clients, "
            f"{scenario.round.clients_per_round} a round, {rounds}.",
            f"- Data: `{data.name}`"
            + (f" ({data.path})" if data.path else "")
            + f", {data.eval_clients} held-out clients for evaluation.",
            f"- Held-out perplexity: {summary['initial_perplexity']:.3f} before training, "
            f"{summary['final_perplexity']:.3f} after.",
            *(
                [f"- Differential privacy: epsilon {summary['privacy']['epsilon']:.3f}."]
                if "privacy" in summary and "epsilon" in summary["privacy"]
                else []
            ),
            "",
            "## Scenario",
            "",
            "```toml",
            scenario.to_toml().rstrip(),
            "```",
            "",
        ]
    )


def _federation(
    grid: Grid,
    scenario: Scenario,
    adapter: AdapterState,
    population: int,
    known_nodes: Mapping[int, int] | None = None,
) -> Any:
    """The strategy (wrapped for privacy), the grid, the fleet and the seed bookkeeping,
    after every cross-section check."""
    strategy = build_strategy(
        scenario.strategy.name,
        dict(scenario.strategy.params),
        population=population,
        clients_per_round=scenario.round.sampled,
    )
    fleet = Fleet.from_scenario(scenario, population) if scenario.devices.enabled else None
    mixed = fleet.mixed_ranks(scenario.lora.r) if fleet is not None else {}
    traits = traits_of(strategy)
    check_federation(scenario, traits, population, mixed)
    private = wrap_private(strategy, scenario, population)  # None without [privacy]
    client = scenario.client
    fed = steps.Federation(
        scenario=scenario,
        strategy=private or strategy,
        traits=traits,
        grid=DeviceGrid(grid, known_nodes),
        fleet=fleet,
        seeds=SeedSync(scenario.run.seed, client.num_seeds, client.lr, client.local_steps),
        attackers=frozenset(attackers(population, scenario.attack, scenario.run.seed)),
        specs=expected_specs(adapter),
        max_bytes=steps.max_update_bytes(adapter),
        mixed=mixed,
        private=private,
    )
    return fed


def _wave(
    fed: steps.Federation,
    rnd: int,
    assignments: list[steps.Assignment],
    adapter: AdapterState,
    wait: float | None = None,
) -> list[steps.Judged]:
    """Send ``assignments`` and judge each reply (or its absence)."""
    sent, judged, waited = steps.send(fed, rnd, assignments, wait)
    return judged + [steps.judge(fed, rnd, a, reply, adapter, waited) for a, reply in sent]


def _paced_waves(
    fed: steps.Federation,
    rnd: int,
    sampled: list[Any],
    assignments: list[steps.Assignment],
    judged: list[steps.Judged],
    adapter: AdapterState,
    round_started: float,
) -> list[steps.Assignment]:
    """A paced strategy's extra waves (FwdLLM's pacing), appended to ``judged``: while
    it asks for more clients, nodes not yet asked this round are sent the round's
    message, within ``round.deadline_s`` of the round's start. Returns the extra
    assignments."""
    extra: list[steps.Assignment] = []
    if not fed.traits.paced or not sampled:
        return extra
    asked = {a.node for a in assignments}
    deadline = round_started + fed.scenario.round.deadline_s
    while (left := deadline - time.perf_counter()) > 0:
        valid = [j.reply for j in judged if j.event["status"] == "ok" and j.reply is not None]
        want = int(fed.strategy.more_clients(rnd, valid, len(asked)))  # type: ignore[attr-defined]
        if want <= 0:
            break
        wave = steps.more_assignments(fed, rnd, len(extra) + 1, sampled[0], asked, want, adapter)
        if not wave:
            log(INFO, "Round %d: pacing wants %d more clients, none is left", rnd, want)
            break
        log(INFO, "Round %d: pacing asks %d more clients", rnd, len(wave))
        asked |= {a.node for a in wave}
        extra += wave
        judged += _wave(fed, rnd, wave, adapter, left)
    return extra


def _aggregate(
    fed: steps.Federation, rnd: int, tally: steps.Tally, evaluate: Any
) -> tuple[AdapterState | None, float, str | None, dict[str, Any]]:
    """The strategy's aggregate of the accepted replies, its held-out perplexity and
    the strategy's own metrics, or (None, nan, reason, metrics) when there is no
    aggregate or it is not finite."""
    arrays, metrics = steps.aggregate_with_metrics(fed.strategy, rnd, tally.accepted)
    if arrays is None:
        return None, math.nan, "the strategy returned no adapter", metrics
    adapter = from_record(arrays)
    bad = sorted(k for k, v in adapter.items() if not bool(v.isfinite().all()))
    if bad:
        return None, math.nan, f"the aggregate has non-finite values ({bad[0]}, ...)", metrics
    score = evaluate(adapter)
    if not math.isfinite(score):
        return None, math.nan, f"the aggregate's held-out perplexity is {score}", metrics
    return adapter, score, None, metrics


def _save(run_dir: Path, fed: steps.Federation, state: RunState, started: float) -> None:
    """Checkpoint the run's state after ``state.round``."""
    state.strategy = strategy_state(fed.strategy)
    state.wall_seconds = time.perf_counter() - started
    save_checkpoint(
        run_dir / "checkpoints",
        state.to_checkpoint(fed.scenario),
        keep=fed.scenario.run.keep_checkpoints,
    )


def _add_tally(totals: Totals, tally: steps.Tally) -> None:
    totals.bytes_up += tally.bytes_up
    totals.bytes_down += tally.bytes_down
    totals.rejected += tally.rejected
    totals.dropped += tally.dropped


def _truncate_events(path: Path, last_round: int) -> None:
    """Keep only events of rounds up to ``last_round`` (rewritten atomically)."""
    if not path.exists():
        return
    kept = [e for e in read_events(path) if e.get("round", 0) <= last_round]
    atomic_write_text(path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))


def _update_saver(run_dir: Path) -> Any:
    """Keep each accepted update for audit (``run.save_updates``), written atomically."""
    from safetensors.torch import save

    def keep(rnd: int, client: int, state: AdapterState, weight: Any) -> None:
        data = save(state, metadata={"num_examples": str(weight), "round": str(rnd)})
        atomic_write_bytes(
            run_dir / "updates" / f"round-{rnd:05d}" / f"client-{client:05d}.safetensors", data
        )

    return keep
