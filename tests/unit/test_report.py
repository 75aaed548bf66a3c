"""fedtune report: an abandoned round is marked and not counted as aggregated; dropped
and rejected clients are listed with their reasons; bytes, tiers and epsilon shown."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.metrics import EventLog, atomic_write_json
from fedtune.report import write_report


def test_report_marks_the_abandoned_round_and_lists_reasons(tmp_path: Path) -> None:
    with EventLog(tmp_path / "metrics.jsonl") as log:
        log.write("round", round=0, perplexity=50.0, participants=0, wall_seconds=0.0)
        for rnd, status in ((1, "ok"), (2, "abandoned"), (3, "ok")):
            log.write(
                "client_update",
                round=rnd,
                client=4,
                status="dropped",
                reason="no reply within 120 s",
            )
            log.write(
                "round",
                round=rnd,
                status=status,
                perplexity=40.0 - rnd,
                participants=1,
                sampled=2,
                rejected=0,
                dropped=1,
                bytes_up=2_000_000,
                bytes_down=3_000_000,
                wall_seconds=1.5,
                epsilon=0.5 * rnd,
                participants_by_tier={"jetson": 1},
                **({"reason": "1 valid updates < round.min_reports = 2"} if status != "ok" else {}),
            )
    atomic_write_json(
        tmp_path / "summary.json",
        {
            "scenario": "tiny",
            "rounds": 3,
            "rounds_completed": 3,
            "initial_perplexity": 50.0,
            "final_perplexity": 37.0,
            "bytes_up": 6_000_000,
            "bytes_down": 9_000_000,
            "wall_seconds": 4.5,
        },
    )
    text = write_report(tmp_path).read_text()
    assert "3 of 3 rounds run, 2 aggregated, 1 abandoned" in text
    assert "6.00 MB up, 9.00 MB down" in text
    assert (
        "| 2 | **abandoned**: 1 valid updates < round.min_reports = 2 | 38.000 | 1 / 2 | jetson:1 |"
        in text
    )
    assert "| 1 / 2 | jetson:1 | 0 | 1 |  | 2.000 | 3.000 | 1.5 |  | 1.500 |" in text
    assert text.count("| dropped | no reply within 120 s |") == 3
    assert (tmp_path / "perplexity.png").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 3
