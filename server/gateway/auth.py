"""Who may call: the enrollment token, per-device credentials and rate limits.

A phone enrolls with the run's token and gets a device id and a credential (stored
here only as a SHA-256); every later call carries ``authorization: Bearer
<device_id>:<credential>``. Each device, and each peer address that enrolls, has a
token bucket.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import grpc
from flwr.common.logger import log

from fedtune.ondevice.proto import device_pb2 as pb
from fedtune.protocol import PROTOCOL_VERSION
from fedtune.server.gateway.settings import GatewayAbort, GatewaySettings


def _read_tokens(path: str) -> set[bytes]:
    """The SHA-256 of each token in ``path`` (one per line; blank lines and ``#``
    comments skipped); the clear tokens are not kept."""
    if not path:
        return set()
    from fedtune.errors import ConfigError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"'gateway.device_tokens': cannot read {path}: {exc}") from None
    tokens = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    short = [i for i, t in enumerate(tokens) if len(t) < 8]
    if not tokens or short:
        raise ConfigError(
            f"'gateway.device_tokens': {path} needs one token of 8 or more characters a line"
        )
    return {hashlib.sha256(t.encode()).digest() for t in tokens}


def printable(text: str, limit: int) -> str:
    """``text`` safe to log: control characters (newlines that would forge log lines,
    terminal escapes) replaced by ``?``, at most ``limit`` characters."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class TokenBucket:
    """``rate`` calls a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> float:
        """0 when a call may go ahead (and counts it), else the seconds to wait."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class Device:
    """An enrolled phone."""

    device_id: str
    secret_hash: bytes
    node_id: int
    client_index: int
    name: str
    bucket: TokenBucket
    capabilities: pb.Capabilities = field(default_factory=pb.Capabilities)
    last_seen: float = field(default_factory=time.monotonic)
    """When it last called (enrolled or authenticated), on the monotonic clock."""


class Devices:
    """The enrolled phones of a run; thread-safe."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.config = settings.config
        self._lock = threading.Lock()
        self._token = (
            hashlib.sha256(self.config.token.encode()).digest() if self.config.token else None
        )
        self._one_time = _read_tokens(self.config.device_tokens)
        """SHA-256 of each unused one-time token (``gateway.device_tokens``)."""
        self.by_id: dict[str, Device] = {}
        self._by_node: dict[int, Device] = {}
        self._enroll_buckets: dict[str, TokenBucket] = {}

    def node_ids(self) -> list[int]:
        with self._lock:
            return [d.node_id for d in self.by_id.values()]

    def at_node(self, node_id: int) -> Device | None:
        with self._lock:
            return self._by_node.get(node_id)

    def __len__(self) -> int:
        return len(self.by_id)

    def enroll(self, request: pb.EnrollRequest, peer: str) -> tuple[Device, str]:
        """A new device and its credential, or a GatewayAbort (rate, version, token,
        no free slot)."""
        with self._lock:
            bucket = self._enroll_buckets.setdefault(
                peer.rsplit(":", 1)[0], TokenBucket(self.config.rate, self.config.burst)
            )
            wait = bucket.take()
        if wait:
            raise GatewayAbort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                pb.RATE_LIMITED,
                "too many enrollments",
                int(wait) + 1,
            )
        if request.protocol_version != PROTOCOL_VERSION:
            raise GatewayAbort(
                grpc.StatusCode.FAILED_PRECONDITION,
                pb.UNSUPPORTED_VERSION,
                f"protocol version {request.protocol_version} is not supported "
                f"(this gateway speaks {PROTOCOL_VERSION})",
            )
        presented = hashlib.sha256(request.enrollment_token.encode()).digest()
        shared = self._token is not None and hmac.compare_digest(presented, self._token)
        with self._lock:
            # Compared in constant time against each one-time token: no early exit.
            one_time = [t for t in self._one_time if hmac.compare_digest(presented, t)]
        if not shared and not one_time:
            log(WARNING, "Enrollment with a wrong or used token from %s", peer)
            raise GatewayAbort(
                grpc.StatusCode.UNAUTHENTICATED,
                pb.BAD_ENROLLMENT_TOKEN,
                "wrong enrollment token (or a one-time token already used)",
            )
        credential = secrets.token_urlsafe(32)
        with self._lock:
            taken = {d.client_index for d in self.by_id.values()}
            free = [i for i in self.settings.client_indices if i not in taken]
            if not free:
                raise GatewayAbort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    pb.TOO_LARGE,
                    "every device slot of this run is taken (gateway.max_devices)",
                )
            node_id = secrets.randbits(63)
            while node_id in self._by_node or node_id == 0:
                node_id = secrets.randbits(63)
            device = Device(
                device_id=uuid.uuid4().hex,
                secret_hash=hashlib.sha256(credential.encode()).digest(),
                node_id=node_id,
                client_index=free[0],
                name=printable(request.device_name, 64),
                bucket=TokenBucket(self.config.rate, self.config.burst),
                capabilities=request.capabilities,
            )
            if one_time and not shared:
                if one_time[0] not in self._one_time:  # a concurrent enrollment took it
                    raise GatewayAbort(
                        grpc.StatusCode.UNAUTHENTICATED,
                        pb.BAD_ENROLLMENT_TOKEN,
                        "wrong enrollment token (or a one-time token already used)",
                    )
                self._one_time.discard(one_time[0])
            self.by_id[device.device_id] = device
            self._by_node[node_id] = device
        log(
            INFO,
            "Device %s (%s) enrolled as client %d, node %d",
            device.device_id,
            device.name,
            device.client_index,
            node_id,
        )
        return device, credential

    def authenticate(self, metadata: Sequence[tuple[str, Any]]) -> Device:
        """The calling device, from ``authorization: Bearer <id>:<credential>``; rate-limited."""
        value = next((str(v) for k, v in metadata if k == "authorization"), "")
        scheme, _, token = value.partition(" ")
        device_id, _, credential = token.partition(":")
        with self._lock:
            device = self.by_id.get(device_id)
        presented = hashlib.sha256(credential.encode()).digest()
        if (
            scheme != "Bearer"
            or device is None
            or not hmac.compare_digest(presented, device.secret_hash)
        ):
            raise GatewayAbort(
                grpc.StatusCode.UNAUTHENTICATED,
                pb.BAD_CREDENTIAL,
                "unknown device or wrong credential "
                "(authorization: Bearer <device_id>:<credential>)",
            )
        with self._lock:
            device.last_seen = time.monotonic()
            wait = device.bucket.take()
        if wait:
            raise GatewayAbort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                pb.RATE_LIMITED,
                f"rate limit of {self.config.rate:g} calls/s exceeded",
                int(wait) + 1,
            )
        return device
