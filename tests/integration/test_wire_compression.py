"""Compressed uploads through a whole federation: smaller, decoded, aggregated."""

from __future__ import annotations

import json

import pytest

from fedtune.metrics import read_events

from ..conftest import simulate_here


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for wire in ("fp32", "int8"):
        run_dir = tmp_path_factory.mktemp("wire") / wire
        simulate_here("tiny", run_dir, "--set", f"client.wire_dtype={wire}")
        out[wire] = run_dir
    return out


def test_int8_uploads_are_smaller(runs):
    def up(run_dir):
        return [u["bytes_up"] for u in read_events(run_dir / "metrics.jsonl", "client_update")]

    fp32, int8 = up(runs["fp32"]), up(runs["int8"])
    assert all(
        u["status"] == "ok" for u in read_events(runs["int8"] / "metrics.jsonl", "client_update")
    )
    # The tiny adapter (1,792 values) is mostly array headers; for SmolLM2's adapter the
    # ratio is 0.278 (benchmarks/wire_bytes.py).
    assert sum(int8) < 0.7 * sum(fp32)
    down = [u["bytes_down"] for u in read_events(runs["int8"] / "metrics.jsonl", "client_update")]
    assert min(down) > max(int8)  # the global adapter still travels down in fp32


def test_int8_run_tracks_fp32(runs):
    fp32 = json.loads((runs["fp32"] / "summary.json").read_text())
    int8 = json.loads((runs["int8"] / "summary.json").read_text())
    assert int8["rounds_completed"] == fp32["rounds_completed"] == 2
    assert int8["final_perplexity"] == pytest.approx(fp32["final_perplexity"], rel=1e-3)
