"""Phones and a Flower SuperNode in one run: SuperLink, ServerApp with the device gateway,
one ``flower-supernode`` and three ``fedtune device`` processes, on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedtune.checkpoint import Checkpoint, checkpoint_path
from fedtune.data.sources import load_shakespeare
from fedtune.metrics import read_events

from ..conftest import ROOT
from .federation import Federation, free_port

pytestmark = pytest.mark.phones

TOKEN = "phones-enrolment-token"
# Runs the device client and reports, at exit, which heavy packages the process imported.
DEVICE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('HEAVY', sorted({m.split('.')[0] for m in sys.modules}"
    " & {'torch', 'flwr', 'transformers'}), flush=True))\n"
    "from fedtune.clients.device import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize(
    "settings",
    [
        (),  # backprop: ORT training artifacts on the phones, FedAvg
        ("client.engine=zeroth", "strategy.name=fedkseed"),  # seed steps up, catch-up down
    ],
    ids=["backprop-fedavg", "zeroth-fedkseed"],
)
def test_supernode_and_three_phones_complete_two_rounds(tmp_path, settings):
    federation = Federation(tmp_path / "fed", partitions=[0])  # client 0: a Flower SuperNode
    port = free_port()
    run_dir = tmp_path / "run"
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedtune.cli",
            "serve",
            "tiny",
            "--out",
            str(run_dir),
            "--superlink",
            federation.address,
            "--nodes",
            "4",
            *(
                arg
                for setting in (
                    "data.num_clients=4",
                    "round.clients_per_round=4",
                    "round.min_reports=4",
                    "round.deadline_s=120",
                    "run.rounds=2",
                    "gateway.enabled=true",
                    f"gateway.port={port}",
                    f"gateway.token={TOKEN}",
                    "gateway.first_client=1",  # phones are clients 1, 2, 3
                    "gateway.check_in_s=2",
                    *settings,
                )
                for arg in ("--set", setting)
            ),
        ],
        cwd=ROOT,
        stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT,
        env=federation.env,
    )
    roles = [c for c in load_shakespeare() if len(c.text) > 5000][-3:]
    phones = []
    for i, role in enumerate(roles):
        data = tmp_path / f"phone{i}.txt"
        data.write_text(role.text[:8000])
        phones.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    DEVICE,
                    "--server",
                    f"127.0.0.1:{port}",
                    "--token",
                    TOKEN,
                    "--data",
                    str(data),
                    "--cache",
                    str(tmp_path / f"phone{i}-cache"),
                    "--name",
                    f"phone{i}",
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        assert serve.wait(timeout=300) == 0, (tmp_path / "serve.log").read_text()[-4000:]
        outputs = [p.communicate(timeout=60)[0] for p in phones]
    finally:
        for p in [serve, *phones]:
            p.kill()
        federation.stop()

    for phone, output in zip(phones, outputs, strict=True):
        assert phone.returncode == 0, output[-3000:]
        assert "the run is over" in output
        assert "HEAVY []" in output, output[-3000:]  # neither torch nor flwr nor transformers
        assert output.count("accepted") == 2

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    rounds = [e for e in read_events(run_dir / "metrics.jsonl", "round") if e["round"] > 0]
    assert [r["participants"] for r in rounds] == [4, 4]
    # The SuperNode was sent the warm-up before round 1; the phones were not.
    (warm,) = read_events(run_dir / "metrics.jsonl", "warm_up")
    assert (warm["workers"], warm["failed"]) == (1, 0)
    updates = list(read_events(run_dir / "metrics.jsonl", "client_update"))
    for rnd in (1, 2):
        ok = sorted(u["client"] for u in updates if u["round"] == rnd and u["status"] == "ok")
        assert ok == [0, 1, 2, 3]
    if "client.engine=zeroth" in settings:  # round 2 sent seed steps, which the gateway
        down = {(u["round"], u["client"]): u["bytes_down"] for u in updates}  # replayed
        assert all(down[2, c] < down[1, c] / 2 for c in (1, 2, 3))
    before = Checkpoint.from_bytes(checkpoint_path(run_dir / "checkpoints", 0).read_bytes())
    after = Checkpoint.from_bytes(checkpoint_path(run_dir / "checkpoints", 2).read_bytes())
    changed = [k for k in before.adapter if not torch.equal(before.adapter[k], after.adapter[k])]
    assert changed, "the global adapter did not change"
    assert json.loads((run_dir / "gateway.json").read_text())["port"] == port
