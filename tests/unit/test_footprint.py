"""The simulated fleet's memory fit reads the device footprint table shipped with fedtune."""

from __future__ import annotations

import json
from types import SimpleNamespace

from fedtune.config import load_scenario
from fedtune.ondevice import footprint
from fedtune.server.fleet import Fleet


def shipped_rows():
    rows = json.loads(footprint.TABLE.read_text())["rows"]
    assert rows, "the shipped footprint table is empty"
    return rows


def scenario_for(row, tmp_path, memory_mb, *extra):
    tiers = tmp_path / "tiers.toml"
    tiers.write_text(
        "".join(
            f"[tiers.{name}]\nslowdown = 1\nmemory_mb = {mb}\nuplink_mbps = 10\n"
            f"downlink_mbps = 10\navailability = 1\ndropout = 0\n\n"
            for name, mb in memory_mb.items()
        )
    )
    quantization = {"none": "none", "int8": "int8", "int4": "int4"}[row["quantization"]]
    return load_scenario(
        "tiny",
        [
            f"model.name={row['model']!r}",
            f"model.quantization={quantization!r}",
            f"lora.r={row['lora_r']}",
            f"client.batch_size={row['batch_size']}",
            f"client.seq_len={row['seq_len']}",
            "devices.enabled=true",
            f"devices.profiles={str(tiers)!r}",
            *extra,
        ],
    )


def test_the_fleet_takes_a_phones_footprint_from_the_shipped_table(tmp_path):
    row = next(
        r for r in shipped_rows() if r["engine"] == "backprop" and r["quantization"] == "int8"
    )
    need = row["peak_rss_mib"]
    scenario = scenario_for(row, tmp_path, {"small": need - 1, "large": need + 1})
    fleet = Fleet.from_scenario(scenario, 8)
    assert fleet.footprints["backprop"] == need
    assert "backprop" in fleet.from_table

    # The fit uses it before any report, and a workstation RSS does not replace it.
    small = fleet.client_tier.index("small")
    large = fleet.client_tier.index("large")
    assert fleet.engine_for(small) == "zeroth" and fleet.engine_for(large) == "backprop"
    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=c)) for c in (small, large)]
    grid = SimpleNamespace(client_index=lambda node: node)
    keep, unfit = fleet.split_unfit(messages, grid, lambda m: "backprop")
    assert [m.metadata.dst_node_id for m in keep] == [large]
    assert "device footprint table" in unfit[0][1]
    event = {
        "client": large,
        "status": "ok",
        "engine": "backprop",
        "peak_rss_mb": 5000.0,
        "bytes_down": 1,
        "bytes_up": 1,
        "compute_seconds": 1.0,
    }
    fleet.apply([(event, None, None)], scenario, 1)
    assert fleet.footprints["backprop"] == need


def test_a_configuration_the_table_lacks_falls_back_to_measuring(tmp_path):
    row = dict(shipped_rows()[0], lora_r=shipped_rows()[0]["lora_r"] + 1)
    fleet = Fleet.from_scenario(scenario_for(row, tmp_path, {"any": 100}), 4)
    assert fleet.footprints == {} and fleet.from_table == {}


def test_devices_settings_give_the_footprints_and_forward_probes_use_inference(tmp_path):
    """devices.backprop_mb / inference_mb stand for a phone's measured figures; forward
    runs on phones only as FwdLLM's probes on the inference graph, so it takes
    inference's. Under client.engine = "auto" with auto_fallback = "forward", a tier
    between the two probes instead of training."""
    row = dict(shipped_rows()[0], lora_r=shipped_rows()[0]["lora_r"] + 1)  # not in the table
    scenario = scenario_for(
        row,
        tmp_path,
        {"mid": 1000, "big": 4000},
        "devices.backprop_mb=1857",
        "devices.inference_mb=358",
    )
    fleet = Fleet.from_scenario(scenario, 8)
    assert fleet.footprints == {"backprop": 1857, "zeroth": 358, "forward": 358}
    mid, big = fleet.client_tier.index("mid"), fleet.client_tier.index("big")
    assert fleet.engine_for(mid, "forward") == "forward"
    assert fleet.engine_for(big, "forward") == "backprop"
    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=mid))]
    grid = SimpleNamespace(client_index=lambda node: node)
    _, unfit = fleet.split_unfit(messages, grid, lambda m: "backprop")
    assert "(devices.backprop_mb)" in unfit[0][1]
