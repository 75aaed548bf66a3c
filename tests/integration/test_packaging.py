"""A plain (non-editable) install exposes fedtune.* and nothing generic."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

from ..conftest import ROOT


def test_plain_install_has_only_fedtune_top_level(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    top = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert top - {"bin"} == {"fedtune"}, top
    for name in (
        "clients/app.py",
        "server/loop.py",
        "strategies/registry.py",
        "simulations/quickstart.toml",
        "simulations/runner.py",
        "ondevice/proto/device.proto",
        "ondevice/proto/device_pb2.py",
        "ondevice/proto/device_pb2_grpc.py",
        "ondevice/footprints.json",
        "server/gateway/core.py",
        "clients/device.py",
    ):
        assert (target / "fedtune" / name).is_file(), name

    # Import from outside the checkout, with the installed copy first and the
    # dependencies' site-packages after it (no .pth files: the editable hook is off).
    deps = sysconfig.get_paths()["purelib"]
    code = (
        "import sys; sys.path[:0] = [sys.argv[1]]; sys.path.append(sys.argv[2]);"
        "import fedtune.clients, fedtune.server, fedtune.strategies, fedtune.simulations;"
        "import fedtune.server.app, fedtune.clients.app, fedtune.server.gateway;"
        "from fedtune.config import shipped_scenarios;"
        "assert 'quickstart' in shipped_scenarios();"
        "print(fedtune.server.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code, str(target), deps],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    ).stdout
    assert Path(out.strip()).is_relative_to(target)
    for generic in ("server", "clients", "strategies", "simulations"):
        probe = subprocess.run(
            [
                sys.executable,
                "-S",
                "-c",
                f"import sys; sys.path[:0] = [sys.argv[1]]; import {generic}",
                str(target),
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert probe.returncode != 0, generic
