"""The ``fedtune`` command: one function per subcommand; each parses, builds, runs."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from fedtune.errors import FedtuneError, RunInterrupted


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedtune.checkpoint import resume_point
    from fedtune.config import load_scenario
    from fedtune.server.app import default_run_dir
    from fedtune.simulations.runner import simulate, simulate_in_process

    if args.resume:
        if args.out:
            raise FedtuneError("--resume continues in its own folder: drop --out")
        run_dir = Path(args.resume)
        requested = None
        if args.scenario or args.set:
            base = args.scenario or run_dir / "scenario.toml"
            requested = load_scenario(base, args.set)
        scenario, checkpoint = resume_point(run_dir, requested, args.allow_config_change)
        print(f"resuming {run_dir} after round {checkpoint.round}")
    else:
        scenario, checkpoint = load_scenario(args.scenario, args.set), None
        run_dir = Path(args.out) if args.out else default_run_dir(scenario)
    run = simulate_in_process if args.in_process else simulate
    summary = run(
        scenario, run_dir, progress=not args.no_progress, verbose=args.verbose, resume=checkpoint
    )
    return _outcome(summary, run_dir)


def _outcome(summary: dict, run_dir: Path) -> int:
    print(
        f"held-out perplexity: {_perplexity(summary.get('initial_perplexity'))} before round 1 "
        f"-> {_perplexity(summary.get('final_perplexity'))} after round "
        f"{summary.get('rounds_completed')}"
    )
    print(f"run folder: {run_dir}  (adapter in {run_dir / 'adapter'})")
    return 0


def _perplexity(value: object) -> str:
    """A perplexity for the screen; the summary holds null where it was not finite."""
    return f"{value:.3f}" if isinstance(value, int | float) else "not finite"


def cmd_serve(args: argparse.Namespace) -> int:
    from fedtune.checkpoint import resume_point
    from fedtune.config import load_scenario
    from fedtune.server.app import default_run_dir
    from fedtune.server.serve import serve

    if args.resume:
        if args.out or args.scenario or args.set:
            raise FedtuneError("--resume continues the run as it was: drop --out, SCENARIO, --set")
        run_dir = Path(args.resume)
        scenario, checkpoint = resume_point(run_dir, None)
        print(f"resuming {run_dir} after round {checkpoint.round}")
    else:
        scenario = load_scenario(args.scenario, args.set)
        run_dir = Path(args.out) if args.out else default_run_dir(scenario)
    summary = serve(
        scenario,
        run_dir,
        superlink=args.superlink,
        nodes=args.nodes,
        resume=bool(args.resume),
        root_certificates=args.root_certificates,
    )
    return _outcome(summary, run_dir)


def cmd_device(argv: list[str]) -> int:
    """``fedtune device ...``: the device client parses its own arguments (and imports
    neither torch nor flwr)."""
    from fedtune.clients.device import main as device_main

    return device_main(argv)


def cmd_scenarios(args: argparse.Namespace) -> int:
    from fedtune.config import shipped_scenarios

    for name, path in shipped_scenarios().items():
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "#")
        print(f"{name:<16} {first.lstrip('# ').strip()}")
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    from fedtune.strategies import registered

    for name, entry in registered().items():
        print(f"{name:<16} {entry.description()}  [{entry.distribution}: {entry.target}]")
        if args.verbose:
            for key, default in entry.parameters().items():
                print(f"{'':<18}{key} = {default}" if default else f"{'':<18}{key} (required)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedtune.simulations.runner import simulate, simulate_in_process
    from fedtune.simulations.sweep import parse_grid, plan, run_sweep

    out = Path(args.out)
    runs = plan(args.scenario, parse_grid(args.grid), args.seeds, out, args.set)
    run = simulate_in_process if args.in_process else simulate
    summaries = run_sweep(
        args.scenario, runs, out, functools.partial(run, progress=not args.no_progress)
    )
    print(f"sweep of {len(summaries)} runs in {out}: fedtune compare {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedtune.compare import compare

    paths = [Path(p) for p in args.runs]
    sweep = len(paths) == 1 and (paths[0] / "sweep.json").is_file()
    out = Path(args.out) if args.out else paths[0] if sweep else Path("compare")
    print(compare(paths, out))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedtune.report import write_report

    print(write_report(Path(args.run_dir)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedtune.models.export import export_run

    out = export_run(Path(args.run_dir), args.format, Path(args.out) if args.out else None)
    print(f"{args.format} export of {args.run_dir}: {out}")
    return 0


def _add_set_argument(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """SCENARIO, --set, --out and --resume: shared by ``simulate`` and ``serve``."""
    p.add_argument(
        "scenario",
        nargs="?",
        default=None,
        help="a shipped scenario name or a .toml path (default: quickstart)",
    )
    _add_set_argument(p, "override one scenario key (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<time>-<scenario>)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last good checkpoint",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune", description="Federated fine-tuning of small language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run a scenario on Flower's simulation engine")
    _add_run_arguments(p)
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: accept a scenario that differs from the checkpoint's",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run clients in this process, one after another, without Ray",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("serve", help="run a scenario on a Flower SuperLink with real SuperNodes")
    _add_run_arguments(p)
    p.add_argument(
        "--superlink",
        default="127.0.0.1:8000",
        help="the SuperLink's Control API address (default: 127.0.0.1:8000)",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="SuperNodes to wait for before round 1 (default: one per client)",
    )
    p.add_argument(
        "--root-certificates",
        default=None,
        type=Path,
        help="CA certificate for a TLS SuperLink (default: insecure, loopback only)",
    )
    p.set_defaults(func=cmd_serve)

    # Listed for --help; main() hands `fedtune device ...` to the device client as is.
    sub.add_parser("device", help="the reference phone client: join a run's device gateway")

    p = sub.add_parser("scenarios", help="list the shipped scenarios")
    p.set_defaults(func=cmd_scenarios)

    p = sub.add_parser("strategies", help="list the registered strategies")
    p.add_argument(
        "--verbose", "-v", action="store_true", help="also list each one's [strategy] keys"
    )
    p.set_defaults(func=cmd_strategies)

    p = sub.add_parser(
        "sweep", help="run a scenario over a grid of overrides and seeds, one run after another"
    )
    p.add_argument("scenario", help="a shipped scenario name or a .toml path")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="SECTION.KEY=V1,V2",
        help="values to sweep for one key (repeatable: the grid is their product)",
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds per grid point (run.seed, +1 each)")
    _add_set_argument(p, "override one key in every run (repeatable)")
    p.add_argument("--out", required=True, help="the sweep folder (run again to resume the sweep)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run clients in this process, one after another, without Ray (tiny models)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="tabulate and plot runs or sweeps: mean +- std over seeds")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders or sweep folders")
    p.add_argument(
        "--out", default=None, help="output folder (default: the sweep folder, or ./compare)"
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="write report.md and plots for a run folder")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write a run's adapter for inference apps")
    p.add_argument("run_dir")
    p.add_argument(
        "--format",
        required=True,
        choices=["peft", "merged", "gguf", "onnx"],
        help="peft adapter, merged safetensors, GGUF LoRA for llama.cpp, or ONNX",
    )
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export-FORMAT)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["device"]:
        return cmd_device(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RunInterrupted as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return INTERRUPTED
    except FedtuneError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return INTERRUPTED


INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def run() -> None:
    """The ``fedtune`` command: :func:`main`, then exit with its status.

    After an interrupted run the process exits at once: the run folder already holds
    all it keeps (checkpoints are fsynced and renamed), and the teardown of Ray's and
    gRPC's native threads at interpreter exit took 5-7 s more on 2 cores.
    """
    code = main()
    if code == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
