"""docs/android.md's zeroth-order test vectors are what the reference client computes,
so an independent phone implementation checked against them replays bit for bit."""

from __future__ import annotations

import json
import re

import numpy as np

from fedtune.ondevice.engines import batch_order, perturbation, seed_pool

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
