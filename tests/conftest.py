"""Shared fixtures: tiny models and small scenarios; nothing here fakes a component."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
