"""What a phone needs in memory to train: the footprint table the device benchmark measures.

``footprints.json`` (shipped with the package) holds, per model, LoRA, engine,
artifact kind and quantization, the peak RSS of the reference device client
(``fedtune.ondevice.engines``, phone session settings, no torch) for one local
training task. ``benchmarks/device.py --write-footprints`` regenerates it. The
simulated fleet (``fedtune.server.fleet``) reads it to decide whether a tier's
memory holds an engine, instead of the workstation client's RSS (which includes
Ray, Flower and torch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("footprints.json")
KEY = ("model", "lora_r", "lora_targets", "engine", "quantization", "batch_size", "seq_len")
DEVICE_QUANTIZATION = {"none": "none", "int8": "int8", "nf4": "int4", "int4": "int4"}
"""``model.quantization`` -> the device artifacts that match it (4-bit kinds share
``int4``: MatMulNBits for inference; a training graph keeps int8, ORT has no 4-bit
gradient)."""


def load(path: Path = TABLE) -> list[dict[str, Any]]:
    """The table's rows (empty when the file is absent)."""
    if not path.is_file():
        return []
    return list(json.loads(path.read_text())["rows"])


def lookup(
    model: str,
    engine: str,
    quantization: str,
    lora_r: int,
    lora_targets: Sequence[str] = (),
    batch_size: int = 4,
    seq_len: int = 128,
    path: Path = TABLE,
) -> float | None:
    """Peak MiB of a device training ``engine`` on ``model`` (None when not measured).

    ``quantization`` is ``model.quantization``; empty ``lora_targets`` means the
    model's default targets (any row matches). For ``backprop`` an int4 base trains
    on the int8 training artifacts."""
    kind = DEVICE_QUANTIZATION.get(quantization, quantization)
    if engine == "backprop" and kind == "int4":
        kind = "int8"
    for row in load(path):
        if (
            row["model"] == model
            and row["engine"] == engine
            and row["quantization"] == kind
            and row["lora_r"] == lora_r
            and (not lora_targets or sorted(row["lora_targets"]) == sorted(lora_targets))
            and row["batch_size"] == batch_size
            and row["seq_len"] == seq_len
        ):
            return float(row["peak_rss_mib"])
    return None


def write_measured(rows: list[dict[str, Any]], path: Path = TABLE) -> Path:
    """Merge measured rows into the table (a row replaces the one with its key)."""
    merged = {tuple(json.dumps(r[k]) for k in KEY): r for r in load(path)}
    merged.update({tuple(json.dumps(r[k]) for k in KEY): r for r in rows})
    body = {
        "about": "peak RSS MiB of the device client per task; benchmarks/device.py "
        "--write-footprints regenerates it",
        "rows": sorted(merged.values(), key=lambda r: [json.dumps(r[k]) for k in KEY]),
    }
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path
