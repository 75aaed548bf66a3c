"""Named numpy arrays <-> the ``TensorBundle`` bytes of device.proto (numpy only)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedtune.ondevice.proto import device_pb2 as pb

DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_INT64: np.dtype("<i8"),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}


def to_bundle(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialize ``arrays`` (float32, float16 or int64), in sorted-name order."""
    bundle = pb.TensorBundle()
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        dtype = array.dtype.newbyteorder("<")
        if dtype not in CODES:
            raise ValueError(f"{name}: dtype {array.dtype} cannot travel (float32/16, int64)")
        bundle.tensors.add(
            name=name,
            shape=list(array.shape),
            dtype=CODES[dtype],
            data=np.ascontiguousarray(array, dtype=dtype).tobytes(),
        )
    return bundle.SerializeToString()


def from_bundle(data: bytes) -> dict[str, np.ndarray]:
    """Parse a serialized bundle; ``ValueError`` names what is wrong with it."""
    bundle = pb.TensorBundle()
    try:
        bundle.ParseFromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ValueError(f"not a TensorBundle: {exc}") from None
    arrays: dict[str, np.ndarray] = {}
    for tensor in bundle.tensors:
        if tensor.name in arrays:
            raise ValueError(f"tensor {tensor.name!r} appears twice")
        if tensor.dtype not in DTYPES:
            raise ValueError(f"{tensor.name}: unknown dtype code {tensor.dtype}")
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"{tensor.name}: negative dimension in shape {list(shape)}")
        dtype = DTYPES[tensor.dtype]
        if len(tensor.data) != math.prod(shape) * dtype.itemsize:
            raise ValueError(
                f"{tensor.name}: {len(tensor.data)} bytes do not hold shape {list(shape)} "
                f"of {dtype.name}"
            )
        arrays[tensor.name] = np.frombuffer(tensor.data, dtype=dtype).reshape(shape).copy()
    return arrays
