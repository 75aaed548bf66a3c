"""``fedtune simulate``: check the scenario, then run it on Flower's simulation engine.

The checks (:mod:`fedtune.server.preflight`) run in the driver before Ray starts.
Ctrl-C asks the run to stop: the ServerApp ends at its next grid call (within a poll),
the run folder keeps its last checkpoint, and ``fedtune simulate --resume RUN_DIR`` goes
on from it; a second Ctrl-C interrupts at once. Progress is a live display on a
terminal and one line per client reply and per round otherwise (a log file).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fedtune.config import Scenario
from fedtune.errors import FedtuneError, RunInterrupted

if TYPE_CHECKING:
    from fedtune.checkpoint import Checkpoint

T = TypeVar("T")


def simulate(
    scenario: Scenario,
    run_dir: Path,
    progress: bool = True,
    verbose: bool = False,
    resume: Checkpoint | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` on Flower's simulation engine (Ray); return the summary.

    With ``resume`` (see :func:`fedtune.checkpoint.resume_point`), continue the run in
    ``run_dir``. The run folder is locked from before its first file to the end.
    """
    from fedtune.server.preflight import check_inputs, check_rules

    _check_run_dir(scenario, run_dir, resume)
    if not verbose:
        # Keep the screen for fedtune's progress: Flower's deprecation notice for
        # run_simulation and library FutureWarnings say nothing a user can act on.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray's workers train while the driver evaluates: OpenMP threads that spin-wait
    # for cores another process holds slowed a training step tenfold on 2 cores.
    # Workers inherit the driver's environment (a user's own setting wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    backend_config = _backend_config(scenario, verbose)
    # The preflight's rules first: a broken one costs a second and starts nothing. Its
    # slow half (~5 s of imports and tokenizing on one core) then runs beside Ray's start
    # and the workers' warm-up; the ServerApp waits for its verdict before the run folder
    # is touched (benchmarks/RESULTS.md: the quickstart's start-up, profiled).
    clients = check_rules(scenario)  # one virtual node per training client
    checks = in_background(check_inputs, scenario)
    start_ray(backend_config)
    return _run(scenario, Path(run_dir), clients, checks, progress, verbose, resume, backend_config)


def _check_run_dir(scenario: Scenario, run_dir: Path, resume: Checkpoint | None) -> None:
    """Secrets given, and a new run's folder free: checks that cost no preflight."""
    from fedtune.config import require_secrets
    from fedtune.rundir import check_new_run_dir

    require_secrets(scenario)
    if resume is None:
        check_new_run_dir(run_dir)


def simulate_in_process(
    scenario: Scenario,
    run_dir: Path,
    progress: bool = True,
    verbose: bool = False,
    resume: Checkpoint | None = None,
) -> dict[str, Any]:
    """:func:`simulate` without Ray: the same preflight, run folder and round loop, with
    each client's real ClientApp called in this process, one after another
    (:class:`~fedtune.server.inprocess.InProcessGrid`). For sweeps of tiny models and
    debugging, where Ray's start (seconds) and isolation add nothing."""
    from fedtune.server.inprocess import InProcessGrid, task_identity
    from fedtune.server.loop import run_federation
    from fedtune.server.preflight import preflight, prepare_run_dir

    _check_run_dir(scenario, run_dir, resume)
    population = preflight(scenario)
    nodes = scenario.simulation.num_supernodes or population
    observer = _observer(scenario) if progress else None
    try:
        with prepare_run_dir(Path(run_dir), resume=resume is not None), task_identity():
            grid = InProcessGrid({1000 + i: i for i in range(nodes)})
            return run_federation(
                grid,
                scenario,
                Path(run_dir),
                observer,
                expected_nodes=nodes,
                resume=resume,
                known_nodes=grid.clients,  # this process made them: nothing to ask
            )
    finally:
        if observer is not None:
            observer.close()


def _run(
    scenario: Scenario,
    run_dir: Path,
    clients: int,
    checks: Future[None],
    progress: bool,
    verbose: bool,
    resume: Checkpoint | None,
    backend_config: dict[str, Any],
) -> dict[str, Any]:
    """:func:`simulate` once Ray is up and the preflight (``checks``) is under way."""
    import json

    from flwr.simulation import run_simulation

    from fedtune.clients.app import app as client_app
    from fedtune.server.app import make_server_app
    from fedtune.server.preflight import prepare_run_dir

    num_nodes = scenario.simulation.num_supernodes or clients
    cpus = backend_config["init_args"]["num_cpus"]
    client_cpus = backend_config["client_resources"]["num_cpus"]
    observer = _observer(scenario) if progress else None
    stop = threading.Event()
    refused: list[BaseException] = []
    with contextlib.ExitStack() as held:

        def gate() -> bool:
            """In the ServerApp, the warm-up sent: the preflight's verdict, then the run
            folder's lock (held to the end of the run). False ends the run before it
            starts: refused (the error is raised here once Ray has stopped) or stopped."""
            try:
                while not stop.is_set():
                    with contextlib.suppress(FutureTimeout):
                        checks.result(timeout=0.1)
                        held.enter_context(prepare_run_dir(run_dir, resume=resume is not None))
                        return True
                return False
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                refused.append(exc)
                return False

        try:
            with stop_on_sigint(stop), engine_partitions() as known:
                server_app = make_server_app(
                    scenario,
                    run_dir,
                    observer,
                    expected_nodes=num_nodes,
                    resume=resume,
                    stop=stop,
                    known_nodes=known,
                    # Flower's Ray backend starts one worker per client_cpus of the CPUs.
                    warm_workers=min(num_nodes, max(1, int(cpus // client_cpus))),
                    gate=gate,
                )
                run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=num_nodes,
                    backend_config=backend_config,
                    verbose_logging=verbose,
                )
        finally:
            if observer is not None:
                observer.close()
        if refused:
            raise refused[0]
        summary_path = run_dir / "summary.json"
        if stop.is_set() and not summary_path.exists():
            raise RunInterrupted(_interrupted(run_dir))
        if not summary_path.exists():
            raise FedtuneError(f"the simulation ended without finishing the run in {run_dir}")
        summary: dict[str, Any] = json.loads(summary_path.read_text())
        return summary


def in_background(work: Callable[..., T], *args: Any) -> Future[T]:
    """``work(*args)`` in a daemon thread; its result (or exception) in the Future.
    Not a ThreadPoolExecutor: its worker thread would hold the process's exit (after a
    Ctrl-C, say) until the preflight's tokenizing ended."""
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(work(*args))
        except BaseException as exc:  # noqa: BLE001 - the Future re-raises it
            future.set_exception(exc)

    threading.Thread(target=run, name="fedtune-preflight", daemon=True).start()
    return future


def _backend_config(scenario: Scenario, verbose: bool) -> dict[str, Any]:
    """Flower's Ray backend settings: one worker per ``simulation.client_cpus`` CPUs."""
    cpus = os.cpu_count() or 1
    return {
        "client_resources": {
            "num_cpus": min(scenario.simulation.client_cpus, cpus),
            "num_gpus": 0.0,
        },
        "init_args": {
            "num_cpus": cpus,
            "include_dashboard": False,
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
        },
    }


def start_ray(backend_config: dict[str, Any]) -> None:
    """Start Ray now, as Flower's Ray backend would start it (its own ``init_ray``, same
    settings): the backend then finds it running. Called in the main thread (Ray's
    processes die with the thread that started them) while the preflight runs beside.

    Where Flower's backend has no ``init_ray`` (another Flower than 1.41), or starting
    fails here, Ray starts as it always did, inside ``run_simulation``, which reports
    any error."""
    try:
        from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    except ImportError:
        return
    init_ray = getattr(RayBackend, "init_ray", None)
    if init_ray is not None:
        with contextlib.suppress(Exception):  # run_simulation starts it again, and says why
            init_ray(types.SimpleNamespace(init_args_key="init_args"), backend_config)


@contextlib.contextmanager
def engine_partitions() -> Iterator[dict[int, int] | None]:
    """While inside, the node id -> partition-id map of the virtual nodes Flower's
    simulation engine registers (filled once it has), for the ServerApp's discovery:
    asking every virtual node which client it is costs ~20 ms a node (each query is a
    message through Ray, and the in-memory SuperLink scans every stored message on
    each poll), which made a 10,000-client population's run take minutes before its
    first round. The engine keeps the map to itself (``vce_api._register_nodes`` returns
    it), so it is read where it is made; None where that function is not found (a
    Flower other than 1.41's layout): discovery then asks the nodes."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        yield None
        return
    original = getattr(vce_api, "_register_nodes", None)
    if original is None:
        yield None
        return
    found: dict[int, int] = {}

    def register(*args: Any, **kwargs: Any) -> Any:
        mapping = original(*args, **kwargs)
        found.update(mapping)
        return mapping

    sweep = vce_api.add_messages_to_queue
    vce_api._register_nodes = register
    vce_api.add_messages_to_queue = _sweep_waiting_nodes(sweep)
    try:
        yield found
    finally:
        vce_api._register_nodes = original
        vce_api.add_messages_to_queue = sweep


def _sweep_waiting_nodes(flowers: Callable[..., None]) -> Callable[..., None]:
    """Flower 1.41's simulation engine hands messages to its workers by asking the link
    state, every 0.1 s, for each registered node in turn whether a message waits for
    it — and each ask scans every stored message. With 10,000 virtual nodes and a
    round's 10 messages stored while clients train, that kept a driver thread busy on
    one of two cores (a 10,000-client population's first round took 424 s against 105 s
    for 100 clients). This sweep asks only the nodes a message waits for, in the same
    (registration) order, one message per node per sweep, as Flower's does. Where the
    link state is not Flower's in-memory one, Flower's own sweep runs."""

    def sweep(
        state: Any, queue: Any, nodes_mapping: dict[int, int], f_stop: threading.Event
    ) -> None:
        if not hasattr(state, "message_ins_store") or not hasattr(state, "lock"):
            flowers(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            with state.lock:
                waiting = {
                    m.metadata.dst_node_id
                    for m in state.message_ins_store.values()
                    if m.metadata.delivered_at == ""
                }
            for node_id in sorted(waiting & nodes_mapping.keys(), key=nodes_mapping.__getitem__):
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
            f_stop.wait(0.1)

    return sweep


@contextlib.contextmanager
def stop_on_sigint(stop: threading.Event) -> Iterator[None]:
    """While inside, the first Ctrl-C sets ``stop`` (the run ends at its next grid call
    and keeps its checkpoint); a second raises KeyboardInterrupt as usual.

    Only the main thread can take signals: elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask_to_stop(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(
            "\nfedtune: stopping after Ctrl-C (the last checkpoint is kept; Ctrl-C again "
            "to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    previous = signal.signal(signal.SIGINT, ask_to_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted(run_dir: Path) -> str:
    """What an interrupted run left, and the command that goes on with it."""
    from fedtune.checkpoint import load_latest_checkpoint

    checkpoint = load_latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        return f"stopped before the first checkpoint: {run_dir} cannot be resumed"
    return (
        f"stopped; {run_dir} keeps its checkpoint after round {checkpoint.round}: "
        f"fedtune simulate --resume {run_dir}"
    )


def _observer(scenario: Scenario) -> RichProgress | LineProgress:
    """A live display on a terminal; plain lines, printed as they happen, in a log."""
    return RichProgress(scenario) if sys.stderr.isatty() else LineProgress()


def round_line(event: dict[str, Any]) -> str:
    """One round's outcome on one line; an abandoned round says so and why."""
    ppl = event.get("perplexity")
    line = (
        f"round {event['round']}: perplexity {_number(ppl, 3)}, {event['participants']} "
        f"updates, {event['rejected']} rejected, {event['dropped']} dropped, "
        f"{event['wall_seconds']:.1f} s"
    )
    if event.get("status") == "abandoned":
        line += f"; ABANDONED ({event.get('reason', 'no reason given')}), adapter unchanged"
    return line


def client_line(rnd: int, event: dict[str, Any]) -> str:
    """One client's reply (or its absence) on one line."""
    status = event.get("status", "")
    line = f"round {rnd} client {event.get('client')}: {status}"
    if status == "ok":
        line += (
            f", loss {_number(event.get('loss'), 4)}, {int(event.get('bytes_up') or 0)} B up, "
            f"{_number(event.get('compute_seconds'), 1)} s"
        )
    elif event.get("reason"):
        line += f" ({event['reason']})"
    return line


def _number(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "n/a"


class LineProgress:
    """Progress as plain lines on stderr, flushed at once: for logs and pipes, where a
    live display shows nothing until it ends."""

    def run_started(self, scenario: Scenario, initial_perplexity: float) -> None:
        self._print(f"held-out perplexity before round 1: {initial_perplexity:.3f}")

    def round_started(self, rnd: int, sampled: int) -> None:
        self._print(f"round {rnd}: {sampled} clients sampled")

    def client_done(self, rnd: int, event: dict[str, Any]) -> None:
        self._print(client_line(rnd, event))

    def round_ended(self, event: dict[str, Any]) -> None:
        self._print(round_line(event))

    def close(self) -> None:
        return None

    @staticmethod
    def _print(line: str) -> None:
        print(line, file=sys.stderr, flush=True)


class RichProgress:
    """Progress on screen: a bar of rounds and one of clients, loss, perplexity, bytes."""

    def __init__(self, scenario: Scenario) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
        )
        self.rounds = self.progress.add_task("rounds", total=scenario.run.rounds, info="")
        self.clients = self.progress.add_task("clients", total=0, info="", visible=False)
        self.bytes = 0
        self.progress.start()

    def run_started(self, scenario: Scenario, initial_perplexity: float) -> None:
        self.console.print(f"held-out perplexity before round 1: {initial_perplexity:.3f}")
        self.progress.update(self.rounds, info=f"ppl {initial_perplexity:.3f}")

    def round_started(self, rnd: int, sampled: int) -> None:
        self.progress.reset(
            self.clients, total=sampled, visible=True, description=f"round {rnd} clients", info=""
        )

    def client_done(self, rnd: int, event: dict[str, Any]) -> None:
        self.bytes += int(event.get("bytes_up") or 0) + int(event.get("bytes_down") or 0)
        loss = event.get("loss")
        info = f"loss {loss:.3f}" if isinstance(loss, float) else event.get("status", "")
        self.progress.advance(self.clients)
        self.progress.update(self.clients, info=f"{info}  {self.bytes / 1e6:.1f} MB moved")

    def round_ended(self, event: dict[str, Any]) -> None:
        ppl = event.get("perplexity")
        self.progress.advance(self.rounds)
        self.progress.update(self.rounds, info=f"ppl {ppl:.3f}" if ppl is not None else "")
        abandoned = event.get("status") == "abandoned"
        self.console.print(round_line(event), style="bold yellow" if abandoned else None)

    def close(self) -> None:
        self.progress.stop()
