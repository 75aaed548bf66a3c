"""The device gateway: phones join a run over fedtune's gRPC DeviceService.

Flower 1.41 talks to its nodes in signed protobuf over HTTP and its Android SDK targets
an API that no longer exists, so phones speak ``fedtune/proto/device.proto`` to this
gateway instead. It runs on a grpcio asyncio server in a thread of the ServerApp, and
:class:`~fedtune.server.grid.GatewayGrid` makes every enrolled phone a node of the
grid the round loop sees: a strategy samples phones like Flower nodes, a train message
to a phone becomes a *task* the phone picks up at check-in, and its upload becomes a
Flower reply with the records a ClientApp sends, so the loop validates it the same way.

Guards, each with a status code and an ``ErrorDetail`` (trailing metadata
``fedtune-error-bin``): the enrollment token and per-device credentials
(UNAUTHENTICATED), a token bucket per device (RESOURCE_EXHAUSTED), chunk and update
size limits (RESOURCE_EXHAUSTED), and update validation — tensor names, shapes, dtype,
finiteness, checksum — (INVALID_ARGUMENT). A bad update closes only its own task: the
loop gets an error reply, logs the reason and goes on. An upload is accepted once per
idempotency key; a repeat is answered ``duplicate = true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log

from fedtune.config import GatewayConfig, Scenario
from fedtune.errors import ConfigError
from fedtune.ondevice.artifacts import NO_TRAINING_GRADIENT, ArtifactSet
from fedtune.ondevice.proto import device_pb2 as pb
from fedtune.ondevice.proto import device_pb2_grpc
from fedtune.ondevice.proto.tensors import from_bundle, to_bundle
from fedtune.wire import (
    ARRAYS_KEY,
    CATCH_UP_KEY,
    CONFIG_KEY,
    DIGEST_KEY,
    ENGINE_KEY,
    METRICS_KEY,
    SEEDS_KEY,
    VERSION_KEY,
    WEIGHT_KEY,
    encode_update,
    seeds_from_record,
    seeds_to_record,
)

PROTOCOL_VERSION = 1
ERROR_KEY = "fedtune-error-bin"
INFO_KEY = "info"
ARTIFACT_CHUNK = 256 * 1024
"""Bytes per GetArtifact chunk: small enough for a phone on a flaky link to resume often."""
MAX_UPDATE_FACTOR = 4
"""An upload may be at most this many times the adapter's fp32 size (as the loop's bound)."""
ENGINE_ARTIFACTS = {
    "backprop": ("training_model", "eval_model", "optimizer_model", "checkpoint", "tokenizer"),
    "zeroth": ("inference_model", "tokenizer"),
}
ERROR_REPLY_CODE = 400
"""Flower ``Error`` code of a phone's refused task (the loop logs its reason)."""
KEPT_ADAPTERS = 4
"""Adapter blobs kept for download (the latest rounds')."""


class GatewayAbort(Exception):
    """Ends a call with a status code and an ErrorDetail."""

    def __init__(
        self, status: grpc.StatusCode, code: int, message: str, retry_after: int = 0
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = pb.ErrorDetail(code=code, message=message, retry_after_seconds=retry_after)


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


@dataclass
class Task:
    """A train message for a phone, from push to reply."""

    proto: pb.Task
    message: Message
    device_id: str
    specs: dict[str, tuple[int, ...]]
    open: bool = True
    accepted_key: str = ""


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway needs, as plain values (see :func:`settings_for`)."""

    config: GatewayConfig
    client_indices: tuple[int, ...]
    wire_dtype: str = "fp32"
    default_eps: float = 1e-2
    default_num_seeds: int = 4096

    @property
    def max_chunk_bytes(self) -> int:
        return self.config.max_chunk_kb * 1024


class Gateway:
    """The DeviceService and the bridge from the round loop's messages to phones."""

    def __init__(self, settings: GatewaySettings, artifacts: ArtifactSet | None) -> None:
        self.settings = settings
        self.config = settings.config
        self.artifacts = artifacts
        self._files = {f.sha256: f for f in artifacts.files.values()} if artifacts else {}
        self._graph = {t.key: t.graph_name for t in artifacts.adapter} if artifacts else {}
        self._lock = threading.Lock()
        self._token = hashlib.sha256(self.config.token.encode()).digest()
        self.devices: dict[str, Device] = {}
        self._by_node: dict[int, Device] = {}
        self._tasks: dict[str, Task] = {}
        self._replies: dict[str, Message | None] = {}
        """Message id -> reply (None until it arrives), for messages sent to phones."""
        self._blobs: dict[str, bytes] = {}
        self._kept: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
        """Device id -> (version, adapter) last sent, for seed catch-up (fedkseed)."""
        self._enroll_buckets: dict[str, TokenBucket] = {}
        self.finished = False
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._grace = 1.0
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> int:
        """Serve in a background thread; returns the bound port."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(ready))
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fedtune-gateway", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure or not self.port:
            raise RuntimeError(f"the device gateway did not start: {failure[:1]}")
        return self.port

    async def _serve(self, ready: threading.Event) -> None:
        options = [
            # Whole messages: a chunk plus its framing; larger ones are refused by gRPC
            # itself with RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", self.settings.max_chunk_bytes + 64 * 1024),
            ("grpc.max_send_message_length", ARTIFACT_CHUNK + 64 * 1024),
        ]
        server = grpc.aio.server(options=options)
        device_pb2_grpc.add_DeviceServiceServicer_to_server(_Servicer(self), server)
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls_certificate:
            key = Path(self.config.tls_private_key).read_bytes()
            chain = Path(self.config.tls_certificate).read_bytes()
            credentials = grpc.ssl_server_credentials([(key, chain)])
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        self._stopping = asyncio.Event()
        ready.set()
        await self._stopping.wait()
        # Stopped from the serving coroutine itself: grpc.aio's stop() scheduled from
        # another thread while wait_for_termination() runs never completes.
        await server.stop(self._grace)

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds) and join the thread."""
        if self._loop is None or self._stopping is None or self._thread is None:
            return
        self._grace = grace
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=grace + 10)

    def finish(self) -> None:
        """The run is over: check-ins are answered ``Finished``."""
        with self._lock:
            self.finished = True
            for task in self._tasks.values():
                task.open = False

    # -- the grid side (called from the round loop's thread) -----------------------
    def node_ids(self) -> list[int]:
        with self._lock:
            return [d.node_id for d in self.devices.values()]

    def owns_node(self, node_id: int) -> bool:
        with self._lock:
            return node_id in self._by_node

    def owns_message(self, message_id: str) -> bool:
        with self._lock:
            return message_id in self._replies

    def push(self, message: Message) -> str:
        """Take a message for a phone; return its message id."""
        message_id = uuid.uuid4().hex
        message.metadata.__dict__["_message_id"] = message_id
        with self._lock:
            device = self._by_node[message.metadata.dst_node_id]
            self._replies[message_id] = None
            is_query = message.metadata.message_type == MessageType.QUERY
            if is_query and INFO_KEY in message.content.config_records:  # DeviceGrid.discover
                info = ConfigRecord({"client-index": device.client_index})
                self._replies[message_id] = Message(RecordDict({INFO_KEY: info}), reply_to=message)
                return message_id
        try:
            task = self._make_task(message, device)
        except ValueError as exc:
            log(WARNING, "Device %s cannot take this message: %s", device.device_id, exc)
            with self._lock:
                self._replies[message_id] = Message(
                    Error(ERROR_REPLY_CODE, f"device gateway: {exc}"), reply_to=message
                )
            return message_id
        with self._lock:
            # A new task supersedes the device's older ones. The previous one is kept (a
            # repeated upload to it still gets its answer); older ones are forgotten with
            # any reply nobody pulled, so a long run does not accumulate them.
            older = [t for t in self._tasks.values() if t.device_id == device.device_id]
            for other in older:
                other.open = False
            for other in older[:-1]:
                del self._tasks[other.proto.task_id]
                self._replies.pop(other.message.metadata.message_id, None)
            self._tasks[task.proto.task_id] = task
        return message_id

    def pull(self, message_ids: Sequence[str]) -> list[Message]:
        out = []
        with self._lock:
            for mid in message_ids:
                reply = self._replies.get(mid)
                if reply is not None:
                    out.append(reply)
                    del self._replies[mid]
        return out

    def _make_task(self, message: Message, device: Device) -> Task:
        if message.metadata.message_type != MessageType.TRAIN:
            raise ValueError(f"message type {message.metadata.message_type!r} is not supported")
        content = message.content
        if CONFIG_KEY not in content.config_records:
            raise ValueError("a train message needs a config record")
        if ARRAYS_KEY not in content.array_records and SEEDS_KEY not in content.array_records:
            raise ValueError("a train message needs the adapter (or seed steps to catch up)")
        config = content.config_records[CONFIG_KEY]
        engine = str(config.get(ENGINE_KEY, config.get("client.engine", "backprop")))
        if engine not in ENGINE_ARTIFACTS:
            raise ValueError(f"engine {engine!r} does not run on devices (backprop, zeroth)")
        if engine not in device.capabilities.engines:
            raise ValueError(f"the device does not run engine {engine!r}")
        for key, allowed in (("lora-fresh", (False,)), ("lora-train", ("all",))):
            if key in config and config[key] not in allowed:
                raise ValueError(f"{key} = {config[key]!r} is not supported on devices")
        if float(config.get("proximal-mu", 0.0)) > 0:
            raise ValueError("FedProx's proximal term is not supported on devices")
        if self.artifacts is None:
            raise ValueError("no on-device artifacts were built for this run")
        if any(name not in self.artifacts.files for name in ENGINE_ARTIFACTS[engine]):
            raise ValueError(f"engine {engine!r} has no artifacts here: {NO_TRAINING_GRADIENT}")
        if SEEDS_KEY in content.array_records:
            arrays = self._catch_up(device, config, content.array_records[SEEDS_KEY])
        else:
            record = content.array_records[ARRAYS_KEY]
            arrays = {k: np.asarray(record[k].numpy(), dtype=np.float32) for k in record}
        if VERSION_KEY in config:  # kept for the next catch-up, as a zeroth ClientApp does
            with self._lock:
                self._kept[device.device_id] = (int(config[VERSION_KEY]), arrays)
        if set(arrays) != set(self._graph):
            raise ValueError("the adapter's tensors differ from the artifacts' (another rank?)")
        blob = to_bundle(arrays)
        blob_id = hashlib.sha256(blob).hexdigest()
        rnd = int(config.get("round", 0))
        seed = np.random.SeedSequence([int(config.get("run.seed", 0)), rnd, device.client_index])
        eps = float(config.get("client.eps", 0.0)) or self.settings.default_eps
        num_seeds = int(config.get("client.num_seeds", self.settings.default_num_seeds))
        refs = [
            pb.ArtifactRef(
                name=name,
                artifact_id=self.artifacts.files[name].sha256,
                size=self.artifacts.files[name].size,
            )
            for name in ENGINE_ARTIFACTS[engine]
        ]
        refs.append(pb.ArtifactRef(name="adapter", artifact_id=blob_id, size=len(blob)))
        proto = pb.Task(
            task_id=uuid.uuid4().hex,
            round=rnd,
            config=pb.TrainConfig(
                engine=engine,
                lr=float(config.get("client.lr", 1e-3)),
                local_steps=int(config.get("client.local_steps", 1)),
                batch_size=int(config.get("client.batch_size", 1)),
                seq_len=int(config.get("client.seq_len", 128)),
                seed=int(seed.generate_state(1)[0]),
                eps=eps,
                run_seed=int(config.get("run.seed", 0)),
                num_seeds=num_seeds,
            ),
            artifacts=refs,
            adapter=[
                pb.TensorSpec(
                    name=k,
                    shape=list(arrays[k].shape),
                    dtype=pb.DTYPE_FLOAT32,
                    graph_name=self._graph[k],
                )
                for k in sorted(arrays)
            ],
            deadline_seconds=float(message.metadata.ttl),
        )
        with self._lock:
            self._blobs[blob_id] = blob
            while len(self._blobs) > KEPT_ADAPTERS:
                del self._blobs[next(iter(self._blobs))]
        specs = {k: tuple(v.shape) for k, v in arrays.items()}
        return Task(proto, message, device.device_id, specs)

    def _catch_up(
        self, device: Device, config: ConfigRecord, record: ArrayRecord
    ) -> dict[str, np.ndarray]:
        """FedKSeed's catch-up on the phone's behalf: the adapter this gateway last sent
        the phone, with the server's seed steps replayed on it and checked against the
        server's digest. The phone itself then downloads the whole adapter."""
        import torch

        from fedtune.engines.seeds import adapter_digest, replay, seed_pool

        start = int(config[CATCH_UP_KEY])
        with self._lock:
            kept = self._kept.get(device.device_id)
        if kept is None or kept[0] != start:
            held = "none" if kept is None else f"version {kept[0]}"
            raise ValueError(
                f"cannot catch up from adapter version {start}: the gateway holds {held}"
            )
        pool = seed_pool(
            int(config.get("run.seed", 0)),
            int(config.get("client.num_seeds", self.settings.default_num_seeds)),
        )
        state = replay(
            {k: torch.from_numpy(v) for k, v in kept[1].items()},
            seeds_from_record(record),
            pool,
            float(config.get("client.lr", 1e-3)),
            str(config.get("lora-train", "all")),
        )
        if adapter_digest(state) != config.get(DIGEST_KEY):
            raise ValueError(f"the adapter replayed from version {start} differs from the server's")
        return {k: v.numpy() for k, v in state.items()}

    # -- the device side (called from the gRPC handlers) ------------------------------
    def enroll(self, request: pb.EnrollRequest, peer: str) -> pb.EnrollResponse:
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
        if not hmac.compare_digest(presented, self._token):
            log(WARNING, "Enrollment with a wrong token from %s", peer)
            raise GatewayAbort(
                grpc.StatusCode.UNAUTHENTICATED, pb.BAD_ENROLLMENT_TOKEN, "wrong enrollment token"
            )
        credential = secrets.token_urlsafe(32)
        with self._lock:
            taken = {d.client_index for d in self.devices.values()}
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
                name=request.device_name[:64],
                bucket=TokenBucket(self.config.rate, self.config.burst),
                capabilities=request.capabilities,
            )
            self.devices[device.device_id] = device
            self._by_node[node_id] = device
        log(
            INFO,
            "Device %s (%s) enrolled as client %d, node %d",
            device.device_id,
            device.name,
            device.client_index,
            node_id,
        )
        return pb.EnrollResponse(
            device_id=device.device_id, credential=credential, protocol_version=PROTOCOL_VERSION
        )

    def authenticate(self, metadata: Sequence[tuple[str, Any]]) -> Device:
        """The calling device, from ``authorization: Bearer <id>:<credential>``; rate-limited."""
        value = next((str(v) for k, v in metadata if k == "authorization"), "")
        scheme, _, token = value.partition(" ")
        device_id, _, credential = token.partition(":")
        with self._lock:
            device = self.devices.get(device_id)
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
            wait = device.bucket.take()
        if wait:
            raise GatewayAbort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                pb.RATE_LIMITED,
                f"rate limit of {self.config.rate:g} calls/s exceeded",
                int(wait) + 1,
            )
        return device

    def check_in(self, device: Device, request: pb.CheckInRequest) -> pb.CheckInResponse:
        with self._lock:
            if request.HasField("capabilities"):
                device.capabilities = request.capabilities
            if self.finished:
                return pb.CheckInResponse(finished=pb.Finished())
            for task in self._tasks.values():
                if task.device_id == device.device_id and task.open:
                    return pb.CheckInResponse(task=task.proto)
        return pb.CheckInResponse(
            wait=pb.Wait(retry_after_seconds=self.config.check_in_s, reason="no task now")
        )

    def artifact(self, artifact_id: str) -> tuple[bytes | Path, int]:
        with self._lock:
            blob = self._blobs.get(artifact_id)
        if blob is not None:
            return blob, len(blob)
        found = self._files.get(artifact_id)
        if found is None:
            raise GatewayAbort(
                grpc.StatusCode.NOT_FOUND, pb.UNKNOWN_ARTIFACT, f"no artifact {artifact_id!r}"
            )
        return found.path, found.size

    def submit(
        self, device: Device, header: pb.UpdateHeader, payload: bytes
    ) -> pb.SubmitUpdateResponse:
        """Validate and accept an upload (the whole payload has arrived)."""
        with self._lock:
            task = self._tasks.get(header.task_id)
            if task is None or task.device_id != device.device_id:
                raise GatewayAbort(
                    grpc.StatusCode.NOT_FOUND, pb.UNKNOWN_TASK, f"no task {header.task_id!r}"
                )
            if task.accepted_key and header.idempotency_key == task.accepted_key:
                return pb.SubmitUpdateResponse(
                    accepted=True, duplicate=True, message="already accepted"
                )
            if not task.open:
                raise GatewayAbort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    pb.TASK_CLOSED,
                    "the task is closed (answered, superseded, or the run is over)",
                )
            if header.round != task.proto.round:
                raise GatewayAbort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    pb.TASK_CLOSED,
                    f"round {header.round} does not match the task's round {task.proto.round}",
                )
            if not header.idempotency_key:
                raise GatewayAbort(
                    grpc.StatusCode.INVALID_ARGUMENT, pb.MALFORMED, "no idempotency key"
                )
            task.open = False  # under the lock: a concurrent repeat sees it taken
        try:
            if hashlib.sha256(payload).hexdigest() != header.sha256:
                raise GatewayAbort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    pb.CHECKSUM_MISMATCH,
                    "sha256 of the upload does not match its header",
                )
        except GatewayAbort:
            with self._lock:
                task.open = True  # a corrupted transfer may be retried
            raise
        zeroth = task.proto.config.engine == "zeroth"
        try:
            if zeroth:
                steps = self._validate_steps(task, header, payload)
            else:
                arrays = self._validate(task, header, payload)
        except GatewayAbort as exc:
            reason = exc.detail.message
            log(WARNING, "Rejected the update of device %s: %s", device.device_id, reason)
            self._reply(task, Message(Error(ERROR_REPLY_CODE, reason), reply_to=task.message))
            raise
        metrics = header.metrics
        # The keys a ClientApp reports (fedtune/clients/app.py): Flower's FedAvg refuses
        # to aggregate replies whose metric keys differ, so phones report the same ones.
        record = MetricRecord(
            {
                WEIGHT_KEY: int(metrics.num_examples),
                "loss": float(metrics.loss),
                "loss-first": float(metrics.loss_first),
                "loss-last": float(metrics.loss_last),
                "compute-seconds": float(metrics.compute_seconds),
                "cpu-seconds": float(metrics.cpu_seconds),
                "peak-rss-mb": float(metrics.peak_rss_mb),
                "client-index": device.client_index,
                "round": int(task.proto.round),
            }
        )
        if zeroth:  # as a zeroth ClientApp replies: the seed steps only
            content = RecordDict({SEEDS_KEY: seeds_to_record(steps), METRICS_KEY: record})
        else:
            import torch

            state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()}
            update = encode_update(state, self.settings.wire_dtype)
            content = RecordDict({ARRAYS_KEY: update, METRICS_KEY: record})
        with self._lock:
            task.accepted_key = header.idempotency_key
        self._reply(task, Message(content, reply_to=task.message))
        log(INFO, "Update of device %s for round %d accepted", device.device_id, header.round)
        return pb.SubmitUpdateResponse(accepted=True, duplicate=False, message="accepted")

    def _validate(
        self, task: Task, header: pb.UpdateHeader, payload: bytes
    ) -> dict[str, np.ndarray]:
        def bad(reason: str) -> GatewayAbort:
            return GatewayAbort(grpc.StatusCode.INVALID_ARGUMENT, pb.BAD_UPDATE, reason)

        try:
            arrays = from_bundle(payload)
        except ValueError as exc:
            raise GatewayAbort(grpc.StatusCode.INVALID_ARGUMENT, pb.MALFORMED, str(exc)) from None
        if set(arrays) != set(task.specs):
            missing, extra = (
                sorted(set(task.specs) - set(arrays)),
                sorted(set(arrays) - set(task.specs)),
            )
            raise bad(f"tensors differ (missing {missing[:2]}, unexpected {extra[:2]})")
        for name, shape in task.specs.items():
            array = arrays[name]
            if tuple(array.shape) != shape:
                raise bad(f"{name}: shape {list(array.shape)}, expected {list(shape)}")
            if array.dtype.kind != "f":
                raise bad(f"{name}: dtype {array.dtype}, expected float32 or float16")
            if not np.isfinite(array).all():
                raise bad(f"{name}: non-finite values")
        if header.metrics.num_examples <= 0:
            raise bad("num_examples must be positive")
        if not np.isfinite(header.metrics.loss):
            raise bad("the reported loss is not finite")
        return arrays

    def _validate_steps(
        self, task: Task, header: pb.UpdateHeader, payload: bytes
    ) -> list[tuple[int, float]]:
        def bad(reason: str) -> GatewayAbort:
            return GatewayAbort(grpc.StatusCode.INVALID_ARGUMENT, pb.BAD_UPDATE, reason)

        indices, scalars = list(header.seed_indices), list(header.seed_scalars)
        config = task.proto.config
        if payload:
            raise bad("a zeroth-order update is its seed steps only: send no tensors")
        if len(indices) != len(scalars) or not 1 <= len(indices) <= config.local_steps:
            raise bad(
                f"{len(indices)} seed indices and {len(scalars)} scalars, expected the same "
                f"number, 1 to {config.local_steps}"
            )
        if any(i >= config.num_seeds for i in indices):
            raise bad(f"seed index outside the pool of {config.num_seeds}")
        if not np.isfinite(np.asarray(scalars, dtype=np.float32)).all():
            raise bad("seed steps: non-finite scalars")
        if header.metrics.num_examples <= 0:
            raise bad("num_examples must be positive")
        return [(int(i), float(np.float32(g))) for i, g in zip(indices, scalars, strict=True)]

    def _reply(self, task: Task, reply: Message) -> None:
        with self._lock:
            message_id = task.message.metadata.message_id
            if message_id in self._replies:  # nobody pulls replies to forgotten messages
                self._replies[message_id] = reply

    def max_update_bytes(self, device: Device, task_id: str) -> int:
        """The largest upload the device's task may take; NOT_FOUND for another task."""
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None or task.device_id != device.device_id:
            raise GatewayAbort(grpc.StatusCode.NOT_FOUND, pb.UNKNOWN_TASK, f"no task {task_id!r}")
        values = sum(int(np.prod(s)) for s in task.specs.values())
        return MAX_UPDATE_FACTOR * 4 * values + 64 * 1024


class _Servicer(device_pb2_grpc.DeviceServiceServicer):
    """gRPC handlers: each turns a :class:`GatewayAbort` into its status and detail."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: GatewayAbort) -> None:
        context.set_trailing_metadata(((ERROR_KEY, exc.detail.SerializeToString()),))
        await context.abort(exc.status, exc.detail.message)

    async def Enroll(  # noqa: N802 - gRPC method names
        self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnrollResponse:
        try:
            return self.gateway.enroll(request, context.peer())
        except GatewayAbort as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None

    async def CheckIn(  # noqa: N802
        self, request: pb.CheckInRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckInResponse:
        try:
            device = self.gateway.authenticate(context.invocation_metadata() or ())
            return self.gateway.check_in(device, request)
        except GatewayAbort as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None

    async def GetArtifact(  # noqa: N802
        self, request: pb.GetArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ArtifactChunk]:
        try:
            self.gateway.authenticate(context.invocation_metadata() or ())
            source, size = self.gateway.artifact(request.artifact_id)
            if request.offset > size:
                raise GatewayAbort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    pb.BAD_OFFSET,
                    f"offset {request.offset} is past the artifact's {size} bytes",
                )
        except GatewayAbort as exc:
            await self._abort(context, exc)
            return
        offset = int(request.offset)
        handle = None if isinstance(source, bytes) else open(source, "rb")
        try:
            if handle is not None:
                handle.seek(offset)
            while offset < size or (size == 0 and offset == 0):
                if handle is None:
                    data = source[offset : offset + ARTIFACT_CHUNK]  # type: ignore[index]
                else:
                    data = handle.read(ARTIFACT_CHUNK)
                yield pb.ArtifactChunk(
                    offset=offset, data=data, total_size=size, sha256=request.artifact_id
                )
                offset += len(data)
                if not data:
                    break
        finally:
            if handle is not None:
                handle.close()

    async def SubmitUpdate(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.UpdateChunk], context: grpc.aio.ServicerContext
    ) -> pb.SubmitUpdateResponse:
        gateway = self.gateway
        try:
            device = gateway.authenticate(context.invocation_metadata() or ())
            header: pb.UpdateHeader | None = None
            parts: list[bytes] = []
            received = 0
            limit = 0
            async for chunk in request_iterator:
                kind = chunk.WhichOneof("part")
                if header is None:
                    if kind != "header":
                        raise GatewayAbort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            pb.MALFORMED,
                            "the first message of an upload must be its header",
                        )
                    header = chunk.header
                    limit = gateway.max_update_bytes(device, header.task_id)
                    if header.total_size > limit:
                        raise GatewayAbort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            pb.TOO_LARGE,
                            f"an update of {header.total_size} bytes exceeds {limit}",
                        )
                    continue
                if kind != "data":
                    raise GatewayAbort(
                        grpc.StatusCode.INVALID_ARGUMENT, pb.MALFORMED, "a second header"
                    )
                if len(chunk.data) > gateway.settings.max_chunk_bytes:
                    raise GatewayAbort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        pb.TOO_LARGE,
                        f"a chunk of {len(chunk.data)} bytes exceeds "
                        f"gateway.max_chunk_kb = {gateway.config.max_chunk_kb}",
                    )
                received += len(chunk.data)
                if received > header.total_size:
                    raise GatewayAbort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        pb.MALFORMED,
                        f"more than the {header.total_size} bytes the header announced",
                    )
                parts.append(chunk.data)
            if header is None:
                raise GatewayAbort(grpc.StatusCode.INVALID_ARGUMENT, pb.MALFORMED, "empty upload")
            if received != header.total_size:
                raise GatewayAbort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    pb.MALFORMED,
                    f"{received} bytes arrived, the header announced {header.total_size}",
                )
            return gateway.submit(device, header, b"".join(parts))
        except GatewayAbort as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None


def settings_for(scenario: Scenario, population: int) -> GatewaySettings:
    """The gateway's settings from a scenario: phones take client indices from
    ``gateway.first_client`` up to ``max_devices`` of them (or the population's end)."""
    cfg = scenario.gateway
    end = population if not cfg.max_devices else min(population, cfg.first_client + cfg.max_devices)
    client = scenario.client
    return GatewaySettings(
        config=cfg,
        client_indices=tuple(range(cfg.first_client, end)),
        wire_dtype=client.wire_dtype,
        default_eps=float(getattr(client, "eps", 0.0) or 1e-2),
        default_num_seeds=int(getattr(client, "num_seeds", 4096)),
    )


@contextlib.contextmanager
def hosted_gateway(scenario: Scenario, grid: Any, run_dir: Path) -> Iterator[Any]:
    """Run ``scenario``'s device gateway around the body; yields the grid to use.

    Without ``[gateway] enabled`` this yields ``grid`` itself. Otherwise it builds the
    on-device artifacts, starts the gateway, writes ``gateway.json`` (address, port)
    into ``run_dir``, and yields a :class:`~fedtune.server.grid.GatewayGrid`. At the end
    phones are told the run is over for a few check-in periods, then the server stops.
    """
    if not scenario.gateway.enabled:
        yield grid
        return
    from fedtune.data import build_population
    from fedtune.metrics import atomic_write_json
    from fedtune.ondevice.artifacts import build_artifacts
    from fedtune.server.grid import GatewayGrid

    cfg = scenario.gateway
    for key in ("tls_certificate", "tls_private_key"):
        path = getattr(cfg, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"'gateway.{key}': no file {path} on the server")
    population = len(build_population(scenario.data).train)
    artifacts = build_artifacts(
        scenario.model.name,
        scenario.model.num_layers,
        scenario.lora,
        scenario.client.weight_decay,
        int8=cfg.artifact_int8,
    )
    gateway = Gateway(settings_for(scenario, population), artifacts)
    port = gateway.start()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        Path(run_dir) / "gateway.json",
        {"host": cfg.host, "port": port, "tls": bool(cfg.tls_certificate)},
    )
    log(
        INFO,
        "Device gateway listening on %s:%d (TLS %s)",
        cfg.host,
        port,
        "on" if cfg.tls_certificate else "off",
    )
    try:
        yield GatewayGrid(grid, gateway)
    finally:
        gateway.finish()
        time.sleep(min(cfg.check_in_s + 1.0, 10.0))  # let phones hear that the run is over
        gateway.stop()
        log(INFO, "Device gateway stopped (%d devices)", len(gateway.devices))
