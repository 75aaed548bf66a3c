"""Shared fixtures: tiny models and small scenarios; nothing here fakes a component."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTEGRATION = Path(__file__).resolve().parent / "integration"


HEAVY_MODULES = {
    "test_device.py",  # ONNX Runtime artifact builds
    "test_gateway.py",  # the same artifacts, served over real gRPC
    "test_quantization.py",  # every quantization backend x compute dtype
    "test_engines_gradient_free.py",  # forward-mode AD and many perturbed forwards
    "test_model_families.py",  # one federated round per model family
    "test_export.py",  # merged, GGUF and ONNX exports
}
"""Unit modules that run in-process but cost minutes in all on 2 cores."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under ``tests/integration`` run whole federations — on Ray, Flower's
    servers, gateways, the ``fedtune`` command in subprocesses, or in this process
    (:func:`simulate_here`): marked ``integration``; the costliest unit modules are
    marked ``heavy``. ``make test-fast`` leaves both out; ``make test``
    runs everything."""
    for item in items:
        path = Path(str(item.fspath))
        if INTEGRATION in path.parents:
            item.add_marker(pytest.mark.integration)
        elif path.name in HEAVY_MODULES:
            item.add_marker(pytest.mark.heavy)


@pytest.fixture(scope="session")
def tokenizer():
    from fedtune.models import load_tokenizer

    return load_tokenizer("tiny-llama")


@pytest.fixture()
def tiny_peft():
    """A fresh tiny Llama with a LoRA adapter (r=4 on q,v)."""
    from fedtune.config import LoraConfig
    from fedtune.models import attach_lora, load_base_model

    base = load_base_model("tiny-llama")
    return attach_lora(base, LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj")), seed=0)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the real ``fedtune`` command in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


def simulate_here(scenario: str, out: Path, *args: str) -> dict:
    """``fedtune simulate SCENARIO --out OUT --set ...`` without Ray
    (:func:`fedtune.simulations.runner.simulate_in_process`: the same preflight, run
    folder and round loop, each client's real ClientApp called in this process).

    ``args`` are the command's ``--set KEY=VALUE`` pairs, so a test reads as the command
    it stands for. For what Ray adds nothing to; tests of the command and of Flower's
    simulation engine themselves use :func:`run_cli`.
    """
    from fedtune.config import load_scenario
    from fedtune.simulations.runner import simulate_in_process

    flags, overrides = args[0::2], list(args[1::2])
    if set(flags) - {"--set"} or len(flags) != len(overrides):
        raise ValueError(f"simulate_here takes --set KEY=VALUE pairs only, got {args}")
    return simulate_in_process(load_scenario(scenario, overrides), out, progress=False)


def watch_and_board(folder: Path) -> Path:
    """A tiers file with a 100 MB watch (too small to train) and a 64 GB board, both
    always available and never dropping out."""
    path = folder / "tiers.toml"
    always = "uplink_mbps = 10\ndownlink_mbps = 10\navailability = 1\ndropout = 0\n"
    path.write_text(
        f"[tiers.watch]\nslowdown = 1\nmemory_mb = 100\n{always}\n"
        f"[tiers.board]\nslowdown = 1\nmemory_mb = 64000\n{always}"
    )
    return path


def engine_config(engine: str = "backprop", **values: object) -> object:
    """Engine ``engine``'s settings object from the given values; the others take
    ``[client]``'s defaults (eps: 1e-2, which suits fp32 and bf16 alike). Values the
    engine has no field for are left out, so one call can serve a test parametrized over
    engines."""
    import dataclasses

    from fedtune.config import ClientConfig
    from fedtune.engines import ForwardSettings, LocalTraining, ZerothSettings

    cls = {"backprop": LocalTraining, "zeroth": ZerothSettings, "forward": ForwardSettings}[engine]
    client, fallback = ClientConfig(), {"eps": 1e-2, "run_seed": 0}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.name in fallback:
            kwargs[f.name] = fallback[f.name]
        elif f.default is dataclasses.MISSING:
            kwargs[f.name] = getattr(client, f.name)
    return cls(**kwargs)
