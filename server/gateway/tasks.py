"""Phones' tasks: made from the loop's train messages, handed out at check-in, closed
by an upload (or superseded), and answered back to the loop as Flower replies.

Message ids are the gateway's own (the loop's grid pairs each reply with the id it
pushed): Flower's message ids are set by its SuperLink, which never sees a phone.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

import grpc
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common.logger import log

from fedtune.engines.seeds import CatchUpError, catch_up_adapter, seed_pool
from fedtune.ondevice.artifacts import ArtifactSet
from fedtune.ondevice.proto import device_pb2 as pb
from fedtune.ondevice.proto.tensors import to_bundle
from fedtune.protocol import (
    ARRAYS_KEY,
    CLIENT_INDEX_KEY,
    DECLINED_REPLY_CODE,
    ERROR_REPLY_CODE,
    INFO_KEY,
    MAX_UPDATE_FACTOR,
    SEEDS_KEY,
    TrainInstructions,
)
from fedtune.server.gateway import translate, validate
from fedtune.server.gateway.auth import Device, printable
from fedtune.server.gateway.settings import KEPT_ADAPTERS, GatewayAbort
from fedtune.wire import ArraySpec, check_seed_reply, check_update, seeds_from_record


@dataclass
class Task:
    """A train message for a phone, from push to reply."""

    proto: pb.Task
    message: Message
    message_id: str
    asked: TrainInstructions
    device_id: str
    specs: dict[str, tuple[int, ...]]
    open: bool = True
    accepted_key: str = ""
    accepted_sha256: str = ""
    """The payload hash accepted under :attr:`accepted_key`: a repeat must match it."""
    bytes_down: int = 0
    """What the device downloaded while this was its task (artifacts and adapter,
    measured by the gateway as served: the phone's own count is not asked)."""
    bytes_up: int = 0
    candidates: int = 0
    """``forward``: the candidate directions drawn to pick its probes."""


class Tasks:
    """Every phone's tasks and the replies the loop has not pulled yet; thread-safe."""

    def __init__(self, artifacts: ArtifactSet | None, fresh_s: float = 10.0) -> None:
        self.artifacts = artifacts
        self.fresh_s = fresh_s
        """A phone heard from within this many seconds is alive: the gateway answers a
        discovery query for it at once; otherwise at its next check-in."""
        self._queries: dict[str, list[tuple[str, Message]]] = {}
        """Device id -> discovery queries waiting for its next check-in."""
        self._graph = {t.key: t.graph_name for t in artifacts.adapter} if artifacts else {}
        self._lock = threading.Lock()
        self.by_id: dict[str, Task] = {}
        self._replies: dict[str, Message | None] = {}
        """Message id -> reply (None until it arrives), for messages sent to phones."""
        self._blobs: dict[str, bytes] = {}
        self._kept: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
        """Device id -> (version, adapter) last sent, for seed catch-up (fedkseed)."""
        self._latest: dict[str, Task] = {}
        """Device id -> its newest task (what its downloads and uploads count toward)."""
        self.finished = False

    # -- the loop's side ------------------------------------------------------------
    def owns(self, message_id: str) -> bool:
        with self._lock:
            return message_id in self._replies

    def push(self, message: Message, device: Device) -> str:
        """Take a message for ``device``; return the id its reply will be paired with."""
        message_id = uuid.uuid4().hex
        with self._lock:
            self._replies[message_id] = None
            is_query = message.metadata.message_type == MessageType.QUERY
            if is_query and INFO_KEY in message.content.config_records:  # discovery
                # A phone not heard from lately (one the loop benched, say) must show
                # it is alive: the answer waits for its next check-in.
                if time.monotonic() - device.last_seen <= self.fresh_s:
                    self._replies[message_id] = _described(device, message)
                else:
                    self._queries.setdefault(device.device_id, []).append((message_id, message))
                return message_id
        try:
            task = self._make_task(message, message_id, device)
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
            older = [t for t in self.by_id.values() if t.device_id == device.device_id]
            for other in older:
                other.open = False
            for other in older[:-1]:
                del self.by_id[other.proto.task_id]
                self._replies.pop(other.message_id, None)
            self.by_id[task.proto.task_id] = task
            self._latest[device.device_id] = task
        return message_id

    def pull(self, message_ids: Sequence[str]) -> list[tuple[str, Message]]:
        """The replies that arrived, each with the id it answers; each is given once."""
        out = []
        with self._lock:
            for mid in message_ids:
                reply = self._replies.get(mid)
                if reply is not None:
                    out.append((mid, reply))
                    del self._replies[mid]
        return out

    def finish(self) -> None:
        with self._lock:
            self.finished = True
            for task in self.by_id.values():
                task.open = False

    def _make_task(self, message: Message, message_id: str, device: Device) -> Task:
        if message.metadata.message_type != MessageType.TRAIN:
            raise ValueError(f"message type {message.metadata.message_type!r} is not supported")
        asked = TrainInstructions.of(message)
        translate.check_phone_can_train(message, asked, device, self.artifacts)
        assert self.artifacts is not None
        content = message.content
        if SEEDS_KEY in content.array_records:
            arrays = self._catch_up(device, asked, content.array_records[SEEDS_KEY])
        else:
            record = content.array_records[ARRAYS_KEY]
            arrays = {k: np.asarray(record[k].numpy(), dtype=np.float32) for k in record}
        if asked.adapter_version is not None:  # kept for the next catch-up, as a ClientApp
            with self._lock:
                self._kept[device.device_id] = (asked.adapter_version, arrays)
        if set(arrays) != set(self._graph):
            raise ValueError("the adapter's tensors differ from the artifacts'")
        probes, candidates = (
            translate.probe_directions(asked, device, arrays, message)
            if asked.engine_name == "forward"
            else ([], 0)
        )
        blob = to_bundle(arrays)
        blob_id = hashlib.sha256(blob).hexdigest()
        ref = pb.ArtifactRef(name="adapter", artifact_id=blob_id, size=len(blob))
        proto = translate.to_task(
            asked,
            device,
            arrays,
            ref,
            self.artifacts,
            self._graph,
            float(message.metadata.ttl),
            probes,
        )
        with self._lock:
            self._blobs[blob_id] = blob
            while len(self._blobs) > KEPT_ADAPTERS:
                del self._blobs[next(iter(self._blobs))]
        specs = {k: tuple(v.shape) for k, v in arrays.items()}
        task = Task(proto, message, message_id, asked, device.device_id, specs)
        task.candidates = candidates
        return task

    def _catch_up(
        self, device: Device, asked: TrainInstructions, record: ArrayRecord
    ) -> dict[str, np.ndarray]:
        """FedKSeed's catch-up on the phone's behalf, from the adapter this gateway last
        sent it; the phone itself then downloads the whole adapter."""
        import torch

        with self._lock:
            kept = self._kept.get(device.device_id)
        client = asked.scenario.client
        try:
            state = catch_up_adapter(
                None
                if kept is None
                else (kept[0], {k: torch.from_numpy(v) for k, v in kept[1].items()}),
                asked.catch_up_from if asked.catch_up_from is not None else -1,
                seeds_from_record(record),
                seed_pool(asked.scenario.run.seed, client.num_seeds),
                client.lr,
                asked.train_only,
                asked.adapter_digest,
            )
        except CatchUpError as exc:
            raise ValueError(f"{exc} in the gateway") from None
        return {k: v.numpy() for k, v in state.items()}

    def count(self, device: Device, down: int = 0, up: int = 0) -> None:
        """Add bytes the device moved to its current task (the newest one); called per
        artifact chunk, so a lookup, not a scan of every task."""
        with self._lock:
            current = self._latest.get(device.device_id)
            if current is not None:
                current.bytes_down += down
                current.bytes_up += up

    def transfer(self, message_id: str) -> tuple[int, int] | None:
        """(bytes down, bytes up) the device moved for the task of ``message_id``."""
        with self._lock:
            task = next((t for t in self.by_id.values() if t.message_id == message_id), None)
        return None if task is None else (task.bytes_down, task.bytes_up)

    # -- the phone's side -------------------------------------------------------------
    def check_in(self, device: Device) -> pb.Task | None:
        """The device's open task, if any; discovery queries that waited for it are
        answered."""
        with self._lock:
            for message_id, query in self._queries.pop(device.device_id, []):
                if message_id in self._replies:
                    self._replies[message_id] = _described(device, query)
            for task in self.by_id.values():
                if task.device_id == device.device_id and task.open:
                    return task.proto
        return None

    def blob(self, artifact_id: str) -> bytes | None:
        with self._lock:
            return self._blobs.get(artifact_id)

    def max_update_bytes(self, device: Device, task_id: str) -> int:
        """The largest upload the device's task may take; NOT_FOUND for another task."""
        task = self._task_of(device, task_id)
        values = sum(int(np.prod(s)) for s in task.specs.values())
        return MAX_UPDATE_FACTOR * 4 * values + 64 * 1024

    def _task_of(self, device: Device, task_id: str) -> Task:
        with self._lock:
            task = self.by_id.get(task_id)
        if task is None or task.device_id != device.device_id:
            raise GatewayAbort(grpc.StatusCode.NOT_FOUND, pb.UNKNOWN_TASK, f"no task {task_id!r}")
        return task

    def submit(
        self, device: Device, header: pb.UpdateHeader, payload: bytes
    ) -> pb.SubmitUpdateResponse:
        """Check an upload (transport here, content by the loop's own checks) and answer
        the loop's message with it."""
        task = self._task_of(device, header.task_id)
        with self._lock:
            if task.accepted_key and header.idempotency_key == task.accepted_key:
                if header.sha256 != task.accepted_sha256:
                    raise GatewayAbort(
                        grpc.StatusCode.ALREADY_EXISTS,
                        pb.KEY_REUSED,
                        "this idempotency key was accepted with other content",
                    )
                return pb.SubmitUpdateResponse(
                    accepted=True, duplicate=True, message="already accepted"
                )
            self._check_open(task, header.round)
            if not header.idempotency_key:
                raise GatewayAbort(
                    grpc.StatusCode.INVALID_ARGUMENT, pb.MALFORMED, "no idempotency key"
                )
            task.open = False  # under the lock: a concurrent repeat sees it taken
        try:
            validate.checksum(header, payload)
        except GatewayAbort:
            with self._lock:
                task.open = True  # a corrupted transfer may be retried
            raise
        try:
            reply = self._reply_of(task, device, header, payload)
        except GatewayAbort as exc:
            reason = exc.detail.message
            log(WARNING, "Rejected the update of device %s: %s", device.device_id, reason)
            self._answer(task, Message(Error(ERROR_REPLY_CODE, reason), reply_to=task.message))
            raise
        with self._lock:
            task.accepted_key, task.accepted_sha256 = header.idempotency_key, header.sha256
        self._answer(task, reply)
        log(INFO, "Update of device %s for round %d accepted", device.device_id, header.round)
        return pb.SubmitUpdateResponse(accepted=True, duplicate=False, message="accepted")

    @staticmethod
    def _check_open(task: Task, rnd: int) -> None:
        """Refuse a call on a closed task, or one naming another round (which leaves the
        task open: the device read the wrong task, it did not lose this one)."""
        if not task.open:
            raise GatewayAbort(
                grpc.StatusCode.FAILED_PRECONDITION,
                pb.TASK_CLOSED,
                "the task is closed (answered, declined, superseded, or the run is over)",
            )
        if rnd != task.proto.round:
            raise GatewayAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                pb.WRONG_ROUND,
                f"round {rnd} is not the task's round {task.proto.round}; the task is open",
            )

    def decline(self, device: Device, request: pb.DeclineTaskRequest) -> pb.DeclineTaskResponse:
        """Close a task its device gives back; the loop counts the device as dropped."""
        task = self._task_of(device, request.task_id)
        reason = printable(request.reason, 200) or "no reason given"
        with self._lock:
            self._check_open(task, request.round)
            task.open = False
        log(
            INFO,
            "Device %s declined its task of round %d: %s",
            device.device_id,
            task.proto.round,
            reason,
        )
        declined = Error(DECLINED_REPLY_CODE, f"declined by the device: {reason}")
        self._answer(task, Message(declined, reply_to=task.message))
        return pb.DeclineTaskResponse()

    def _reply_of(
        self, task: Task, device: Device, header: pb.UpdateHeader, payload: bytes
    ) -> Message:
        """The translated reply, after the same checks the loop runs on it."""
        config = task.proto.config
        if config.engine == "zeroth":
            steps = validate.decode_steps(header, payload)
            reply = translate.to_reply(
                task.proto, task.asked, device, header, None, steps, task.message
            )
            _, reason = check_seed_reply(reply, config.num_seeds, config.local_steps)
        elif config.engine == "forward":  # FwdLLM's probes: the directions sent, in order
            steps = validate.decode_steps(header, payload)
            validate.check_probes(steps, config.probe_indices)
            extra = translate.probe_metrics(len(steps), task.candidates)
            reply = translate.to_reply(
                task.proto, task.asked, device, header, None, steps, task.message, extra
            )
            _, reason = check_seed_reply(reply, config.num_seeds, len(config.probe_indices))
        else:
            arrays = validate.decode_arrays(payload)
            reply = translate.to_reply(
                task.proto, task.asked, device, header, arrays, None, task.message
            )
            specs = {k: ArraySpec(s) for k, s in task.specs.items()}
            max_bytes = MAX_UPDATE_FACTOR * 4 * sum(int(np.prod(s)) for s in task.specs.values())
            wire = task.asked.scenario.client.wire_dtype
            _, reason = check_update(reply, specs, max_bytes, wire)
        if reason is not None:
            raise validate.bad_update(reason)
        if not np.isfinite(header.metrics.loss):
            raise validate.bad_update("the reported loss is not finite")
        return reply

    def _answer(self, task: Task, reply: Message) -> None:
        with self._lock:
            if task.message_id in self._replies:  # nobody pulls replies to forgotten messages
                self._replies[task.message_id] = reply


def _described(device: Device, query: Message) -> Message:
    """The gateway's answer to a discovery query for ``device``: which client it is."""
    info = ConfigRecord({CLIENT_INDEX_KEY: device.client_index})
    return Message(RecordDict({INFO_KEY: info}), reply_to=query)
