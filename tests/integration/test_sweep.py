"""``fedtune sweep`` over 2 strategies x 2 seeds on the tiny model, resumed; then
``fedtune compare`` writes the table (mean +- std over seeds) and the overlaid plot."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

SWEEP = ("--grid", "strategy.name=fedavg,median", "--seeds", "2", "--set", "run.rounds=1")


@pytest.mark.slow  # four in-process runs and a resume, ~90 s on 2 cores
def test_sweep_resumes_and_compare_writes_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    first = run_cli("sweep", "tiny", *SWEEP, "--out", str(out), "--in-process", "--no-progress")
    assert first.returncode == 0, first.stderr
    listed = json.loads((out / "sweep.json").read_text())["runs"]
    names = [r["dir"] for r in listed]
    assert names == [
        "strategy.name=fedavg,run.seed=0",
        "strategy.name=fedavg,run.seed=1",
        "strategy.name=median,run.seed=0",
        "strategy.name=median,run.seed=1",
    ]
    assert all((out / n / "summary.json").is_file() for n in names)

    # One run never started, one stopped after its checkpoint: the rest are skipped.
    shutil.rmtree(out / names[3])
    (out / names[2] / "summary.json").unlink()
    again = run_cli("sweep", "tiny", *SWEEP, "--out", str(out), "--in-process", "--no-progress")
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert sum("finished before, skipped" in ln for ln in lines) == 2, again.stdout
    assert any(names[2] in ln and "resuming after round 1" in ln for ln in lines), again.stdout
    assert any(names[3] in ln and "starting" in ln for ln in lines), again.stdout
    assert all((out / n / "summary.json").is_file() for n in names)

    done = run_cli("compare", str(out))
    assert done.returncode == 0, done.stderr
    table = (out / "compare.md").read_text()
    assert "4 runs in 2 groups" in table
    assert "| strategy.name=fedavg | 2 / 2 | 0 1 |" in table
    assert "| strategy.name=median | 2 / 2 | 0 1 |" in table
    assert (out / "compare.png").stat().st_size > 10_000
    with open(out / "compare.csv") as handle:
        rows = {r["group"]: r for r in csv.DictReader(handle)}
    for group, runs in (("strategy.name=fedavg", names[:2]), ("strategy.name=median", names[2:])):
        finals = [
            json.loads((out / n / "summary.json").read_text())["final_perplexity"] for n in runs
        ]
        assert float(rows[group]["final_perplexity"]) == pytest.approx(sum(finals) / 2)
