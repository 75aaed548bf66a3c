"""Regenerate the Python stubs of ``device.proto`` (``make proto``).

The generated ``device_pb2.py`` / ``device_pb2_grpc.py`` are committed, so the
runtime needs only ``grpcio`` and ``protobuf``; regenerating needs ``grpcio-tools``
(a dev dependency; pick a release whose protobuf requirement fits flwr's ``<7``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent


def main() -> int:
    from grpc_tools import protoc

    # Paths relative to the repository root make the generated imports
    # `from fedtune.ondevice.proto import device_pb2`, which works wherever fedtune is installed.
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        str((HERE / "device.proto").relative_to(ROOT)),
    ]
    return int(protoc.main(args))


if __name__ == "__main__":
    sys.exit(main())
