"""The gRPC side: the DeviceService handlers, the server's thread, and hosting the
gateway for a run.

Guards, each with a status code and an ``ErrorDetail`` (trailing metadata
:data:`~fedtune.protocol.ERROR_KEY`): the enrollment token and per-device credentials
(UNAUTHENTICATED), a token bucket per device (RESOURCE_EXHAUSTED), chunk and update
size limits (RESOURCE_EXHAUSTED), and update validation (INVALID_ARGUMENT). A bad update
closes only its own task: the loop gets an error reply, logs the reason and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from logging import INFO
from pathlib import Path
from typing import Any

import grpc
from flwr.common.logger import log

from fedtune.config import Scenario
from fedtune.errors import ConfigError
from fedtune.ondevice.proto import device_pb2 as pb
from fedtune.ondevice.proto import device_pb2_grpc
from fedtune.protocol import ERROR_KEY
from fedtune.server.gateway.core import Gateway
from fedtune.server.gateway.settings import ARTIFACT_CHUNK, GatewayAbort, settings_for


class GatewayServer:
    """A grpcio asyncio server for ``gateway`` in a thread of its own."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._grace = 1.0
        self._thread: threading.Thread | None = None

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
        config = self.gateway.config
        options = [
            # Whole messages: a chunk plus its framing; larger ones are refused by gRPC
            # itself with RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", self.gateway.settings.max_chunk_bytes + 64 * 1024),
            ("grpc.max_send_message_length", ARTIFACT_CHUNK + 64 * 1024),
        ]
        server = grpc.aio.server(options=options)
        device_pb2_grpc.add_DeviceServiceServicer_to_server(_Servicer(self.gateway), server)
        address = f"{config.host}:{config.port}"
        if config.tls_certificate:
            key = Path(config.tls_private_key).read_bytes()
            chain = Path(config.tls_certificate).read_bytes()
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
            device = self.gateway.authenticate(context.invocation_metadata() or ())
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
                chunk = pb.ArtifactChunk(
                    offset=offset, data=data, total_size=size, sha256=request.artifact_id
                )
                yield chunk
                self.gateway.tasks.count(device, down=chunk.ByteSize())
                offset += len(data)
                if not data:
                    break
        finally:
            if handle is not None:
                handle.close()

    async def DeclineTask(  # noqa: N802
        self, request: pb.DeclineTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeclineTaskResponse:
        try:
            device = self.gateway.authenticate(context.invocation_metadata() or ())
            return self.gateway.decline(device, request)
        except GatewayAbort as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None

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
            gateway.tasks.count(device, up=header.ByteSize() + received)
            return gateway.submit(device, header, b"".join(parts))
        except GatewayAbort as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None


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
        trust_remote_code=scenario.model.trust_remote_code,
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
        log(INFO, "Device gateway stopped (%d devices)", len(gateway.registry))
