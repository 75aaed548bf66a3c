"""The gateway: enrolled phones, their tasks, and the bridge to the round loop.

:class:`~fedtune.server.grid.GatewayGrid` calls the grid side (``node_ids``,
``owns_node``, ``push``, ``pull``) from the loop's thread; the gRPC handlers
(:mod:`fedtune.server.gateway.service`) call the device side (``enroll``,
``authenticate``, ``check_in``, ``artifact``, ``submit``) from the server's thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from flwr.app import Message

from fedtune.ondevice.artifacts import ArtifactSet
from fedtune.ondevice.proto import device_pb2 as pb
from fedtune.protocol import PROTOCOL_VERSION
from fedtune.server.gateway.auth import Device, Devices
from fedtune.server.gateway.settings import GatewayAbort, GatewaySettings
from fedtune.server.gateway.tasks import Tasks


class Gateway:
    """The DeviceService's state and the bridge from the round loop's messages to phones."""

    def __init__(self, settings: GatewaySettings, artifacts: ArtifactSet | None) -> None:
        self.settings = settings
        self.config = settings.config
        self.artifacts = artifacts
        self._files = {f.sha256: f for f in artifacts.files.values()} if artifacts else {}
        self.registry = Devices(settings)
        self.tasks = Tasks(artifacts, fresh_s=2 * self.config.check_in_s + 5)
        self.server: Any = None
        """The gRPC server while serving (:meth:`start`)."""

    @property
    def devices(self) -> dict[str, Device]:
        return self.registry.by_id

    @property
    def finished(self) -> bool:
        return self.tasks.finished

    # -- lifecycle (the server lives in fedtune.server.gateway.service) -------------------
    def start(self) -> int:
        """Serve in a background thread; returns the bound port."""
        from fedtune.server.gateway.service import GatewayServer

        self.server = GatewayServer(self)
        return self.server.start()

    @property
    def port(self) -> int:
        return self.server.port if self.server is not None else 0

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            self.server.stop(grace)

    def finish(self) -> None:
        """The run is over: check-ins are answered ``Finished``."""
        self.tasks.finish()

    # -- the grid side (called from the round loop's thread) -----------------------------
    def node_ids(self) -> list[int]:
        return self.registry.node_ids()

    def owns_node(self, node_id: int) -> bool:
        return self.registry.at_node(node_id) is not None

    def owns_message(self, message_id: str) -> bool:
        return self.tasks.owns(message_id)

    def push(self, message: Message) -> str:
        """Take a message for a phone; return the id its reply is paired with."""
        device = self.registry.at_node(message.metadata.dst_node_id)
        if device is None:
            raise KeyError(f"node {message.metadata.dst_node_id} is not an enrolled phone")
        return self.tasks.push(message, device)

    def transfer(self, message_id: str) -> tuple[int, int] | None:
        """(bytes down, bytes up) a phone moved for the message ``message_id``, as the
        gateway served and received them (None: not a phone's task)."""
        return self.tasks.transfer(message_id)

    def pull(self, message_ids: Sequence[str]) -> list[tuple[str, Message]]:
        """Replies that arrived, each with the message id it answers."""
        return self.tasks.pull(message_ids)

    # -- the device side (called from the gRPC handlers) ----------------------------------
    def enroll(self, request: pb.EnrollRequest, peer: str) -> pb.EnrollResponse:
        device, credential = self.registry.enroll(request, peer)
        return pb.EnrollResponse(
            device_id=device.device_id, credential=credential, protocol_version=PROTOCOL_VERSION
        )

    def authenticate(self, metadata: Sequence[tuple[str, Any]]) -> Device:
        return self.registry.authenticate(metadata)

    def check_in(self, device: Device, request: pb.CheckInRequest) -> pb.CheckInResponse:
        if request.HasField("capabilities"):
            device.capabilities = request.capabilities
        if self.tasks.finished:
            return pb.CheckInResponse(finished=pb.Finished())
        task = self.tasks.check_in(device)
        if task is not None:
            return pb.CheckInResponse(task=task)
        return pb.CheckInResponse(
            wait=pb.Wait(retry_after_seconds=self.config.check_in_s, reason="no task now")
        )

    def artifact(self, artifact_id: str) -> tuple[bytes | Path, int]:
        blob = self.tasks.blob(artifact_id)
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
        return self.tasks.submit(device, header, payload)

    def decline(self, device: Device, request: pb.DeclineTaskRequest) -> pb.DeclineTaskResponse:
        return self.tasks.decline(device, request)

    def max_update_bytes(self, device: Device, task_id: str) -> int:
        return self.tasks.max_update_bytes(device, task_id)
