"""Hostile and careless input (issue 15): one ``fedtune: error:`` line, exit code 2,
within seconds, and nothing left that looks like a run.

The command runs in-process (``fedtune.cli.main``): each case costs milliseconds once
the first has imported the package, where a subprocess would cost 20-30 s of imports.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedtune.checkpoint import MAGIC, Checkpoint, save_checkpoint
from fedtune.cli import main
from fedtune.config import load_scenario

Setup = Callable[[Path], list[str]]


def one_error(capsys, argv: list[str]) -> str:
    """Run the command; assert exit 2 and exactly one error line, within seconds."""
    started = time.monotonic()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("fedtune: error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    assert elapsed < 20, f"took {elapsed:.1f} s"
    return lines[0]


# ------------------------------------------------------------------ the inputs

JSONL_GOOD = json.dumps({"client_id": "a", "text": "hello " * 100}) + "\n"


def jsonl(second_line: bytes) -> Setup:
    """A JSONL data set whose second line is ``second_line``."""

    def setup(tmp: Path) -> list[str]:
        path = tmp / "users.jsonl"
        path.write_bytes(JSONL_GOOD.encode() + second_line + b"\n")
        return ["simulate", "tiny", "--set", "data.name=jsonl", "--set", f"data.path={path}"]

    return setup


def overrides(*items: str) -> Setup:
    def setup(tmp: Path) -> list[str]:
        return ["simulate", "tiny", *(a for item in items for a in ("--set", item))]

    return setup


def non_utf8_toml(tmp: Path) -> list[str]:
    path = tmp / "bad.toml"
    path.write_bytes(b"[run]\nseed = 1\n# caf\xe9\n")
    return ["simulate", str(path)]


def out_is_a_file(tmp: Path) -> list[str]:
    (tmp / "run").write_text("not a folder\n")
    return ["simulate", "tiny"]


def saved_run(tmp: Path, rnd: int = 1) -> Path:
    """A run folder as a crash leaves it: scenario and a checkpoint, no summary."""
    run = tmp / "run"
    run.mkdir()
    scenario = load_scenario("tiny")
    (run / "scenario.toml").write_text(scenario.to_toml())
    history = {"initial_perplexity": 9.0, "current_perplexity": 8.0, "rounds_completed": rnd}
    checkpoint = Checkpoint(
        rnd, "tiny", scenario.to_toml(), scenario.digest(), {"w": torch.zeros(2)}, {}, history
    )
    save_checkpoint(run / "checkpoints", checkpoint, keep=3)
    return run


def checkpoint_is_a_directory(tmp: Path) -> list[str]:
    run = tmp / "run"
    (run / "checkpoints" / "round-00001.ckpt").mkdir(parents=True)
    return ["simulate", "--resume", str(run)]


def foreign_checkpoint(tmp: Path) -> list[str]:
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    import hashlib
    import io

    buffer = io.BytesIO()
    torch.save({"model": torch.ones(3), "epoch": 7}, buffer)  # another program's file
    payload = buffer.getvalue()
    data = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
    (run / "checkpoints" / "round-00001.ckpt").write_bytes(data)
    return ["simulate", "--resume", str(run)]


def changed_lora_rank(tmp: Path) -> list[str]:
    run = saved_run(tmp)
    return ["simulate", "--resume", str(run), "--set", "lora.r=2", "--allow-config-change"]


CASES: dict[str, tuple[Setup, list[str]]] = {
    "non-UTF-8 TOML": (non_utf8_toml, ["bad.toml:3", "not UTF-8"]),
    "JSONL non-UTF-8 byte": (
        jsonl(b'{"client_id": "b", "text": "caf\xe9"}'),
        ["users.jsonl:2", "not UTF-8"],
    ),
    "JSONL 5,000-digit client id": (
        jsonl(b'{"client_id": ' + b"7" * 5000 + b', "text": "x"}'),
        ["users.jsonl:2", "not usable JSON"],
    ),
    "JSONL deep nesting": (
        jsonl(b'{"client_id": "b", "text": "x", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ["users.jsonl:2", "nested deeper than 32"],
    ),
    "JSONL lone surrogate": (
        jsonl(b'{"client_id": "b", "text": "x\\ud800y"}'),
        ["users.jsonl:2", "'text' holds a lone surrogate"],
    ),
    "JSONL 50 MB line": (
        jsonl(b'{"client_id": "b", "text": "' + b"x" * (50 << 20) + b'"}'),
        ["users.jsonl:2", "longer than 16 MiB"],
    ),
    "run.seed = -1": (overrides("run.seed=-1"), ["'run.seed' must be at least 0", "-1"]),
    "run.seed = 2**32": (overrides(f"run.seed={2**32}"), ["'run.seed' must be at most"]),
    "simulation.client_cpus = 1e-6": (
        overrides("simulation.client_cpus=1e-6"),
        ["'simulation.client_cpus' must be at least 0.25"],
    ),
    "client.batch_size = 1e9": (
        overrides("client.batch_size=1000000000"),
        ["'client.batch_size' must be at most 4096"],
    ),
    "client.lr = inf": (overrides("client.lr=inf"), ["'client.lr' must be finite", "inf"]),
    "client.lr = nan": (overrides("client.lr=nan"), ["'client.lr' must be finite", "nan"]),
    "round.deadline_s = inf": (overrides("round.deadline_s=inf"), ["'round.deadline_s'"]),
    "--out naming a file": (out_is_a_file, ["run is a file, not a run folder"]),
    "checkpoint is a directory": (
        checkpoint_is_a_directory,
        ["no valid checkpoint", "round-00001.ckpt: not a regular file"],
    ),
    "foreign checkpoint, valid checksum": (
        foreign_checkpoint,
        ["no valid checkpoint", "round-00001.ckpt: not a fedtune checkpoint payload"],
    ),
    "--allow-config-change with lora.r": (
        changed_lora_rank,
        ["changes lora.r", "even with --allow-config-change"],
    ),
}


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """Pay the first import of torch, transformers and flwr (20-40 s on a loaded machine)
    once, outside the timed cases: a preflight that fails on its data, after the
    model's checks."""
    out = tmp_path_factory.mktemp("warm") / "run"
    assert main(["simulate", "tiny", "--set", "data.min_chars=100000000", "--out", str(out)]) == 2


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_and_exit_2(case, tmp_path, capsys, warm):
    setup, needles = CASES[case]
    argv = setup(tmp_path)
    out = tmp_path / "run"
    if "--resume" not in argv:
        argv += ["--out", str(out)]
    line = one_error(capsys, argv)
    for needle in needles:
        assert needle in line, line
    assert not (out / "summary.json").exists()
    if "--resume" not in argv and out.is_dir():  # nothing written for a new run
        assert list(out.iterdir()) == []


def test_every_numeric_field_has_an_upper_bound():
    """A typo of a few orders of magnitude is refused for every number in a scenario."""
    from dataclasses import fields

    from fedtune.config import SECTIONS, StrategyConfig
    from fedtune.errors import ConfigError

    unbounded = []
    for section, cls in SECTIONS.items():
        if cls is StrategyConfig:
            continue
        for f in fields(cls):
            if f.type not in ("int", "float"):
                continue
            huge = 10**30 if f.type == "int" else float("inf")
            try:
                load_scenario("tiny", [f"{section}.{f.name}={huge}"])
            except ConfigError as exc:
                assert f"{section}.{f.name}" in str(exc), str(exc)
                continue
            unbounded.append(f"{section}.{f.name}")
    assert unbounded == []


# ------------------------------------------------------------------ the run folder


def hold_lock(run: Path) -> subprocess.Popen:
    """Another process holding ``run``'s lock, as a running fedtune would."""
    run.mkdir(exist_ok=True)
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run / ".lock")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("resume", [False, True], ids=["new run", "resume"])
def test_a_busy_run_folder_is_refused_at_once(tmp_path, capsys, resume):
    run = saved_run(tmp_path) if resume else tmp_path / "run"
    holder = hold_lock(run)
    try:
        argv = ["simulate", "--resume", str(run)] if resume else ["simulate", "tiny"]
        argv += [] if resume else ["--out", str(run)]
        line = one_error(capsys, argv)
        assert "is in use by another fedtune process" in line
        assert f"(pid {holder.pid})" in line
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_exclusive_and_released(tmp_path):
    from fedtune.errors import FedtuneError
    from fedtune.server.preflight import prepare_run_dir

    run = tmp_path / "run"
    with prepare_run_dir(run):
        with pytest.raises(FedtuneError, match="in use by another fedtune process"):
            prepare_run_dir(run, resume=True)
    prepare_run_dir(run, resume=True).release()  # free again once released


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_run_folders_are_0700_and_secrets_0600_under_umask_022(tmp_path, umask_022):
    from fedtune.metrics import SECRET_MODE, atomic_directory, atomic_write_text
    from fedtune.server.preflight import prepare_run_dir

    run = tmp_path / "run"
    prepare_run_dir(run).release()
    assert mode(run) == 0o700
    atomic_write_text(run / "secrets.toml", "x", mode=SECRET_MODE)
    assert mode(run / "secrets.toml") == 0o600
    atomic_write_text(run / "plain.txt", "x")
    assert mode(run / "plain.txt") == 0o644  # the umask's, as open() would give
    os.umask(0o077)
    atomic_write_text(run / "private.txt", "x")
    assert mode(run / "private.txt") == 0o600  # no longer forced to 0644
    with atomic_directory(run / "adapter") as folder:
        (folder / "f").write_text("x")
    assert mode(run / "adapter") == 0o700


TOKEN = "s3cret-enrollment-token"


def test_the_token_is_in_neither_scenario_nor_checkpoint(tmp_path, monkeypatch):
    from fedtune.config import REDACTED, require_secrets, secret_overrides, secrets_toml
    from fedtune.errors import ConfigError

    monkeypatch.delenv("FEDTUNE_GATEWAY_TOKEN", raising=False)
    scenario = load_scenario("tiny", ["gateway.enabled=true", f"gateway.token={TOKEN}"])
    text = scenario.to_toml()
    assert TOKEN not in text and REDACTED in text
    checkpoint = Checkpoint(0, "tiny", text, scenario.digest(), {}, {}, {})
    assert TOKEN.encode() not in checkpoint.to_bytes()
    (tmp_path / "scenario.toml").write_text(text)

    saved = load_scenario(tmp_path / "scenario.toml")  # read back: the token is not there
    with pytest.raises(ConfigError, match="gateway.token.*FEDTUNE_GATEWAY_TOKEN"):
        require_secrets(saved)
    monkeypatch.setenv("FEDTUNE_GATEWAY_TOKEN", TOKEN)  # supplied again on resume
    assert load_scenario(tmp_path / "scenario.toml") == scenario
    monkeypatch.delenv("FEDTUNE_GATEWAY_TOKEN")
    secrets = tmp_path / "secrets.toml"  # what `fedtune serve` hands its ServerApp
    secrets.write_text(secrets_toml(scenario))
    again = load_scenario(tmp_path / "scenario.toml", secret_overrides(secrets))
    assert again == scenario
    require_secrets(again)


def test_a_resume_takes_the_token_again_and_ignores_its_redaction(tmp_path, monkeypatch):
    from fedtune.checkpoint import resume_point

    monkeypatch.delenv("FEDTUNE_GATEWAY_TOKEN", raising=False)
    settings = ["gateway.enabled=true", f"gateway.token={TOKEN}"]
    scenario = load_scenario("tiny", settings)
    run = tmp_path / "run"
    history = {"initial_perplexity": 9.0, "current_perplexity": 8.0, "rounds_completed": 1}
    save_checkpoint(
        run / "checkpoints",
        Checkpoint(1, "tiny", scenario.to_toml(), scenario.digest(), {}, {}, history),
        keep=1,
    )
    resumed, _ = resume_point(run, load_scenario("tiny", settings))
    assert resumed.gateway.token == TOKEN  # not "differs in gateway.token"


def test_identity_json_is_0600_under_umask_022(tmp_path, umask_022):
    from fedtune.clients.device import DeviceClient
    from fedtune.config import GatewayConfig, LoraConfig
    from fedtune.ondevice.artifacts import build_artifacts
    from fedtune.server.gateway import Gateway, GatewaySettings

    lora = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj"))
    config = GatewayConfig(enabled=True, port=0, token=TOKEN)
    gateway = Gateway(
        GatewaySettings(config, client_indices=(0,)), build_artifacts("tiny-llama", 0, lora)
    )
    gateway.start()
    try:
        client = DeviceClient(f"127.0.0.1:{gateway.port}", TOKEN, tmp_path / "phone")
        client.enroll()
        client.close()
    finally:
        gateway.stop(grace=0.1)
    identity = tmp_path / "phone" / "identity.json"
    assert json.loads(identity.read_text())["credential"]
    assert mode(identity) == 0o600


def test_a_50_mb_jsonl_line_is_refused_without_reading_it_whole(tmp_path):
    from fedtune.data import load_jsonl
    from fedtune.errors import DataError
    from fedtune.metrics import peak_rss_mb, reset_peak_rss

    path = tmp_path / "users.jsonl"
    path.write_bytes(JSONL_GOOD.encode() + b'{"client_id": "b", "text": "' + b"x" * (50 << 20))
    reset_peak_rss()
    before = peak_rss_mb()
    with pytest.raises(DataError, match="users.jsonl:2: line longer than 16 MiB"):
        load_jsonl(path)
    assert peak_rss_mb() - before < 100  # one bounded line, not gigabytes


# ------------------------------------------------------------------ the event log

EVENTS = [{"event": "round", "round": r, "perplexity": 10.0 - r} for r in range(3)]


def write_events(path: Path, torn: bytes = b"") -> None:
    path.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in EVENTS) + torn)


def test_a_torn_last_event_line_is_dropped_by_every_reader(tmp_path, capsys, caplog):
    from fedtune.metrics import EventLog, read_events
    from fedtune.server.loop import _truncate_events

    path = tmp_path / "metrics.jsonl"
    write_events(path, b'{"event": "client_update", "rou')  # killed mid-append
    with caplog.at_level("WARNING", logger="fedtune"):
        assert list(read_events(path)) == EVENTS
    assert "torn last line" in caplog.text

    assert main(["report", str(tmp_path)]) == 0  # `fedtune report` of the crashed run
    assert "| 2 | ok | 8.000 |" in (tmp_path / "report.md").read_text()
    capsys.readouterr()

    _truncate_events(path, 1)  # what the loop does on resume
    assert list(read_events(path)) == EVENTS[:2]

    write_events(path, b'{"event": "round", "ro')
    with EventLog(path) as log:  # appending after a torn line starts a line of its own
        log.write("round", round=3)
    assert [e["round"] for e in read_events(path)] == [0, 1, 2, 3]


def test_a_damaged_middle_event_line_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(e) for e in EVENTS]
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    line = one_error(capsys, ["report", str(tmp_path)])
    assert "metrics.jsonl:2: not a JSON event" in line


def test_the_cli_reports_a_run_whose_final_perplexity_is_not_finite(tmp_path, capsys):
    """The summary writes a non-finite perplexity as null; the command used to crash
    formatting it after the run had ended."""
    from fedtune.cli import _outcome

    summary = {"initial_perplexity": 10.0, "final_perplexity": None, "rounds_completed": 3}
    assert _outcome(summary, tmp_path) == 0
    assert "10.000 before round 1 -> not finite after round 3" in capsys.readouterr().out


def test_a_client_past_64_mib_of_jsonl_text_is_refused_at_its_line(tmp_path):
    from fedtune.data import load_jsonl
    from fedtune.errors import DataError

    line = json.dumps({"client_id": "greedy", "text": "x" * (14 << 20)}).encode() + b"\n"
    (tmp_path / "users.jsonl").write_bytes(JSONL_GOOD.encode() + line * 5)  # 70 MiB
    with pytest.raises(DataError, match=r"users.jsonl:6: client 'greedy' holds more than 64"):
        load_jsonl(tmp_path / "users.jsonl")
