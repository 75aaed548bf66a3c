"""A real Flower deployment on loopback for tests: one SuperLink, N SuperNodes.

Every process runs in its own process group so a test can SIGKILL a node together with
the ClientApp process it spawned, as a phone that loses power would vanish.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Federation:
    """``node_config`` is added to every SuperNode's (after its ``partition-id``);
    ``env`` to every process's environment (benchmarks/warm_deploy.py uses both)."""

    def __init__(
        self,
        folder: Path,
        partitions: list[int],
        node_config: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.node_config = node_config
        self.env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_HOME": str(folder / "flwr-home"),
            # Each SuperNode's SuperExec looks for a message to run every 0.1 s, not
            # every second (docs/deploy.md, "Warm ClientApps").
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
            **(env or {}),
        }
        self.superlink = self._start(
            "superlink", [str(BIN / "flower-superlink"), "--insecure", "--port", str(self.port)]
        )
        self._wait_for_port()
        self.nodes = {p: self.start_node(p) for p in partitions}

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            cwd=self.folder,
        )

    def _wait_for_port(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"SuperLink did not listen on {self.address}")

    def start_node(self, partition: int) -> subprocess.Popen:
        return self._start(
            f"node{partition}",
            [
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                self.address,
                "--node-config",
                f"partition-id={partition} {self.node_config}".strip(),
                "--port",
                str(free_port()),
            ],
        )

    def kill_node(self, partition: int) -> None:
        proc = self.nodes.pop(partition)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in [*self.nodes.values(), self.superlink]:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self.nodes.clear()
