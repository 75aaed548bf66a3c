"""Transport checks of an upload: what the wire format itself promises.

The payload's checksum, that it decodes as a TensorBundle of floating-point tensors (or,
for a zeroth or forward task, that it is empty and the header's seed steps pair up; for
a forward task, that they probe exactly the directions sent). Whether the update is
*good* — tensor names, shapes, finiteness, the example count, the seed indices — is
the round loop's :func:`fedtune.wire.check_update` /
:func:`~fedtune.wire.check_seed_reply`, which the gateway runs on the translated reply
to answer the phone at once: one implementation, not a second copy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import grpc
import numpy as np

from fedtune.ondevice.proto import device_pb2 as pb
from fedtune.ondevice.proto.tensors import from_bundle
from fedtune.server.gateway.settings import GatewayAbort


def checksum(header: pb.UpdateHeader, payload: bytes) -> None:
    if hashlib.sha256(payload).hexdigest() != header.sha256:
        raise GatewayAbort(
            grpc.StatusCode.INVALID_ARGUMENT,
            pb.CHECKSUM_MISMATCH,
            "sha256 of the upload does not match its header",
        )


def bad_update(reason: str) -> GatewayAbort:
    return GatewayAbort(grpc.StatusCode.INVALID_ARGUMENT, pb.BAD_UPDATE, reason)


def decode_arrays(payload: bytes) -> dict[str, np.ndarray]:
    """The uploaded tensors; refused unless the bundle decodes and each is a float."""
    try:
        arrays = from_bundle(payload)
    except ValueError as exc:
        raise GatewayAbort(grpc.StatusCode.INVALID_ARGUMENT, pb.MALFORMED, str(exc)) from None
    for name, array in arrays.items():
        if array.dtype.kind != "f":
            raise bad_update(f"{name}: dtype {array.dtype}, expected float32 or float16")
    return arrays


def decode_steps(header: pb.UpdateHeader, payload: bytes) -> list[tuple[int, float]]:
    """A zeroth or forward upload's seed steps, from its header (no tensors)."""
    if payload:
        raise bad_update("a seed-step update (zeroth, forward) is its steps only: send no tensors")
    indices, scalars = list(header.seed_indices), list(header.seed_scalars)
    if len(indices) != len(scalars):
        raise bad_update(f"{len(indices)} seed indices and {len(scalars)} scalars differ")
    if any(i >= 2**31 for i in indices):  # travels as int32 to the loop
        raise bad_update("seed index outside the pool")
    return [(int(i), float(np.float32(g))) for i, g in zip(indices, scalars, strict=True)]


def check_probes(steps: list[tuple[int, float]], sent: Sequence[int]) -> None:
    """A forward upload probes exactly the task's ``probe_indices``, in order: the server
    chose them (discriminatively), and a phone's own choice would bias the estimate."""
    indices = [i for i, _ in steps]
    if indices != list(sent):
        raise bad_update(
            f"the probes' seed indices {indices[:8]} are not the task's probe_indices "
            f"{list(sent)[:8]} (same indices, same order)"
        )
