"""docs/android.md's zeroth-order and forward-probe test vectors are what the reference
client computes, so an independent phone implementation checked against them replays
bit for bit (and probes the batches the server expects)."""

from __future__ import annotations

import json
import re

import numpy as np

from fedtune.ondevice.engines import batch_order, perturbation, probe_plan, seed_pool
from fedtune.ondevice.proto import device_pb2 as pb

from ..conftest import ROOT


def test_the_documented_zeroth_vectors_are_the_reference_clients():
    text = (ROOT / "docs" / "android.md").read_text()
    block = re.search(r"zeroth-vectors:begin -->\n```json\n(.*?)\n```", text, re.S)
    assert block is not None
    v = json.loads(block.group(1))
    pool = seed_pool(v["run_seed"], v["num_seeds"])
    assert pool == v["pool"] and pool[2] == v["z_seed"]
    first = int(np.random.PCG64(v["z_seed"]).random_raw(1)[0])
    assert first == int(v["z_first_raw_word"], 16)
    shapes = [(name, tuple(np.array(z).shape)) for name, z in sorted(v["z"].items())]
    z = perturbation(v["z_seed"], shapes)
    assert {k: a.astype(int).tolist() for k, a in z.items()} == v["z"]
    picks = np.random.default_rng(v["task_seed"]).integers(4096, size=4).tolist()
    assert picks == v["picks_of_4096"]
    b = v["batches"]
    order = batch_order(b["num_chunks"], b["batch_size"], b["local_steps"], v["task_seed"])
    assert [x.tolist() for x in order] == b["order"]


def test_the_documented_forward_task_is_the_reference_clients():
    text = (ROOT / "docs" / "android.md").read_text()
    section = text[text.index("## Forward probes (FwdLLM), exactly") :]
    block = re.search(r"forward-vectors:begin -->\n```json\n(.*?)\n```", section, re.S)
    assert block is not None
    v = json.loads(block.group(1))
    config = pb.TrainConfig(
        engine="forward",
        seed=v["task_seed"],
        batch_size=v["batch_size"],
        num_seeds=v["num_seeds"],
        probe_indices=v["probe_indices"],
    )
    plan = probe_plan(config, v["num_chunks"])
    assert [[j, batch.tolist()] for j, batch in plan] == v["probes"]
    # The doc's table names every TrainConfig field, and only those: a field added to the
    # proto must say what a forward task does with it.
    table = section[: section.index("The artifacts are")]
    named = {
        f for cell in re.findall(r"^\| (.+?) \|", table, re.M) for f in re.findall(r"`(\w+)`", cell)
    }
    assert named == {f.name for f in pb.TrainConfig.DESCRIPTOR.fields}
