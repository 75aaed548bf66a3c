"""The reference device client: what an Android app does, in Python without torch or flwr.

``fedtune device --server HOST:PORT --token T --data FILE`` enrolls with a run's device
gateway (``fedtune.server.gateway``), checks in until the run is over, and for each
task downloads the artifacts it names (cached by sha256, a broken download resumed
from its offset), trains the global adapter on its own text with ONNX Runtime and
uploads the update (chunked, with an idempotency key, retried on a broken link).

It uses only grpcio, numpy, ``tokenizers`` and onnxruntime(-training); the engines
(``backprop`` on the ORT training artifacts, ``zeroth`` and ``forward`` — FwdLLM's probes,
no step — on the inference graph) live in ``fedtune.ondevice.engines``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedtune.metrics import SECRET_MODE, atomic_write_text, peak_rss_mb
from fedtune.ondevice.engines import ENGINES, chunk_text, onnxruntime, read_text
from fedtune.ondevice.proto import device_pb2 as pb
from fedtune.ondevice.proto import device_pb2_grpc
from fedtune.ondevice.proto.tensors import from_bundle, to_bundle
from fedtune.protocol import ERROR_KEY, PROTOCOL_VERSION

UPLOAD_CHUNK = 1 << 20
RETRIES = 5
"""Attempts of a download or an upload over a broken link before giving up."""
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class DeviceError(Exception):
    """The gateway refused a call; ``code`` is the gRPC status, ``detail`` its ErrorDetail."""

    def __init__(self, code: grpc.StatusCode, detail: pb.ErrorDetail, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.detail = detail


def error_of(exc: grpc.RpcError) -> DeviceError:
    """A gRPC error as a :class:`DeviceError`, with the gateway's ErrorDetail if sent."""
    detail = pb.ErrorDetail()
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_KEY:
            detail.ParseFromString(value)
    return DeviceError(exc.code(), detail, exc.details() or "")


# ------------------------------------------------------------------ the protocol


def capabilities() -> pb.Capabilities:
    ort = onnxruntime()
    runtimes = ["onnxruntime"]
    if hasattr(ort.capi._pybind_state, "Module"):
        runtimes.insert(0, "onnxruntime-training")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    engines = ["zeroth", "forward"]  # plain inference: every ONNX Runtime build
    if "onnxruntime-training" in runtimes:
        engines.insert(0, "backprop")
    return pb.Capabilities(
        ram_bytes=ram,
        runtimes=runtimes,
        engines=engines,
        charging=True,
        network=pb.NETWORK_UNMETERED,
        platform=f"{sys.platform} python{sys.version_info.major}.{sys.version_info.minor}",
    )


class DeviceClient:
    """One device: its channel, identity, artifact cache and training loop."""

    def __init__(
        self,
        server: str,
        token: str,
        cache: Path,
        root_certificates: bytes | None = None,
        name: str = "",
        connect_timeout: float = 30.0,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.name = name or f"device-{uuid.uuid4().hex[:8]}"
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self.channel = grpc.secure_channel(server, credentials)
        else:
            self.channel = grpc.insecure_channel(server)
        self.stub = device_pb2_grpc.DeviceServiceStub(self.channel)
        self.device_id = ""
        self.credential = ""

    def close(self) -> None:
        self.channel.close()

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.device_id}:{self.credential}"),)

    def enroll(self) -> str:
        """Enroll once; the identity is kept in the cache folder for restarts."""
        identity = self.cache / "identity.json"
        if identity.exists():
            saved = json.loads(identity.read_text())
            if saved.get("token") == hashlib.sha256(self.token.encode()).hexdigest():
                self.device_id, self.credential = saved["device_id"], saved["credential"]
                return self.device_id
        try:
            reply = self.stub.Enroll(
                pb.EnrollRequest(
                    protocol_version=PROTOCOL_VERSION,
                    enrollment_token=self.token,
                    device_name=self.name,
                    capabilities=capabilities(),
                ),
                timeout=self.connect_timeout,
                wait_for_ready=True,  # the gateway may not be up yet
            )
        except grpc.RpcError as exc:
            raise error_of(exc) from None
        self.device_id, self.credential = reply.device_id, reply.credential
        atomic_write_text(  # 0600: the credential lets anyone act as this device
            identity,
            json.dumps(
                {
                    "device_id": self.device_id,
                    "credential": self.credential,
                    "token": hashlib.sha256(self.token.encode()).hexdigest(),
                }
            ),
            mode=SECRET_MODE,
        )
        return self.device_id

    def check_in(self) -> pb.CheckInResponse:
        try:
            return self.stub.CheckIn(
                pb.CheckInRequest(capabilities=capabilities()), metadata=self.auth, timeout=30
            )
        except grpc.RpcError as exc:
            raise error_of(exc) from None

    def fetch(self, ref: pb.ArtifactRef, stop_after: int | None = None) -> Path:
        """The artifact's file in the cache, downloaded (or resumed) as needed.

        A partial download stays in ``<id>.part``; the next call asks for the rest from
        its size. ``stop_after`` cancels the stream after that many new bytes (a
        broken link, for tests); the file is then returned unfinished as ``.part``.
        """
        folder = self.cache / "artifacts"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / ref.artifact_id
        if final.exists():
            return final
        part = folder / f"{ref.artifact_id}.part"
        for attempt in range(RETRIES):
            offset = part.stat().st_size if part.exists() else 0
            received = 0
            stream = self.stub.GetArtifact(
                pb.GetArtifactRequest(artifact_id=ref.artifact_id, offset=offset),
                metadata=self.auth,
                timeout=600,
            )
            try:
                with open(part, "ab") as out:
                    for chunk in stream:
                        if chunk.offset != offset + received:
                            raise DeviceError(
                                grpc.StatusCode.DATA_LOSS,
                                pb.ErrorDetail(),
                                f"chunk at {chunk.offset}, expected {offset + received}",
                            )
                        out.write(chunk.data)
                        received += len(chunk.data)
                        if stop_after is not None and received >= stop_after:
                            stream.cancel()
                            return part
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt == RETRIES - 1:
                    raise error_of(exc) from None
                time.sleep(min(2**attempt, 10))
                continue
            break
        digest = hashlib.sha256(part.read_bytes()).hexdigest()
        if digest != ref.artifact_id:
            part.unlink()
            raise DeviceError(
                grpc.StatusCode.DATA_LOSS, pb.ErrorDetail(), f"sha256 mismatch for {ref.name}"
            )
        os.replace(part, final)
        return final

    def submit(
        self,
        task: pb.Task,
        arrays: dict[str, np.ndarray],
        metrics: pb.UpdateMetrics,
        key: str | None = None,
        steps: Sequence[tuple[int, float]] | None = None,
    ) -> pb.SubmitUpdateResponse:
        """Upload an update (or, for ``zeroth`` and ``forward``, only its seed ``steps``);
        a broken link is retried with the same idempotency key."""
        payload = to_bundle(arrays) if steps is None else b""
        header = pb.UpdateHeader(
            task_id=task.task_id,
            round=task.round,
            idempotency_key=key or uuid.uuid4().hex,
            total_size=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
            metrics=metrics,
            seed_indices=[i for i, _ in steps or ()],
            seed_scalars=[g for _, g in steps or ()],
        )

        def chunks() -> Iterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(header=header)
            for start in range(0, len(payload), UPLOAD_CHUNK):
                yield pb.UpdateChunk(data=payload[start : start + UPLOAD_CHUNK])

        for attempt in range(RETRIES):
            try:
                return self.stub.SubmitUpdate(chunks(), metadata=self.auth, timeout=120)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt == RETRIES - 1:
                    raise error_of(exc) from None
                time.sleep(min(2**attempt, 10))
        raise AssertionError("unreachable")

    def decline(self, task: pb.Task, reason: str) -> None:
        """Give the task back (the round counts this device as dropped at once)."""
        request = pb.DeclineTaskRequest(task_id=task.task_id, round=task.round, reason=reason)
        try:
            self.stub.DeclineTask(request, metadata=self.auth, timeout=30)
        except grpc.RpcError as exc:
            raise error_of(exc) from None

    def run_task(self, task: pb.Task, text: str) -> pb.SubmitUpdateResponse:
        """Download, train (or probe, for ``forward``), submit: one task."""
        engine = ENGINES.get(task.config.engine)
        if engine is None:
            raise ValueError(f"engine {task.config.engine!r} is not supported on this device")
        paths = {ref.name: self.fetch(ref) for ref in task.artifacts}
        adapter = from_bundle(paths["adapter"].read_bytes())
        chunks = chunk_text(paths["tokenizer"], text, task.config.seq_len)
        cpu_started = time.process_time()
        result = engine(paths, adapter, list(task.adapter), chunks, task.config)
        metrics = pb.UpdateMetrics(
            cpu_seconds=time.process_time() - cpu_started,
            num_examples=result.num_examples,
            loss=sum(result.losses) / len(result.losses),
            loss_first=result.losses[0],
            loss_last=result.losses[-1],
            compute_seconds=result.seconds,
            peak_rss_mb=peak_rss_mb(),
        )
        return self.submit(task, result.arrays, metrics, steps=result.steps)

    def run(self, text: str, max_tasks: int = 0, log: Any = print) -> int:
        """Check in until the run is over (or ``max_tasks`` are done); tasks done."""
        self.enroll()
        log(f"enrolled as {self.device_id}")
        done = 0
        failures = 0
        while max_tasks == 0 or done < max_tasks:
            try:
                reply = self.check_in()
            except DeviceError as exc:
                if exc.detail.code == pb.BAD_CREDENTIAL and failures == 0:
                    # A new server (a resumed run) does not know this identity: enroll again.
                    (self.cache / "identity.json").unlink(missing_ok=True)
                    self.enroll()
                    failures += 1
                    continue
                if exc.code not in RETRYABLE or failures >= 30:
                    raise
                failures += 1
                time.sleep(1.0)
                continue
            failures = 0
            outcome = reply.WhichOneof("outcome")
            if outcome == "finished":
                log("the run is over")
                break
            if outcome == "wait":
                time.sleep(max(reply.wait.retry_after_seconds, 1) * 0.2)
                continue
            task = reply.task
            try:
                answer = self.run_task(task, text)
            except (ValueError, MemoryError, RuntimeError, OSError) as exc:
                # This device cannot run the task: say so instead of letting the round
                # wait for it until its deadline (and getting the same task again).
                log(f"round {task.round}: declined ({type(exc).__name__}: {exc})")
                self.decline(task, f"{type(exc).__name__}: {exc}")
                continue
            done += 1
            log(f"round {task.round}: update {'accepted' if answer.accepted else 'refused'}")
        return done


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune device", description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="the device gateway, HOST:PORT")
    p.add_argument("--token", required=True, help="the run's enrollment token")
    p.add_argument("--data", required=True, type=Path, help="this device's text (.txt, .jsonl)")
    p.add_argument(
        "--cache", type=Path, default=None, help="artifact cache and identity (default: per data)"
    )
    p.add_argument("--name", default="", help="a name for this device in the server's log")
    p.add_argument("--root-certificates", type=Path, default=None, help="CA for a TLS gateway")
    p.add_argument("--max-tasks", type=int, default=0, help="stop after N tasks (0: run's end)")
    p.add_argument(
        "--connect-timeout", type=float, default=300.0, help="seconds to wait for the gateway"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.data.is_file():
        print(f"fedtune device: error: no data file {args.data}", file=sys.stderr)
        return 2
    cache = (
        args.cache
        or Path(os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune")
        / "device"
        / hashlib.sha256(str(args.data.resolve()).encode()).hexdigest()[:12]
    )
    certs = args.root_certificates.read_bytes() if args.root_certificates else None
    client = DeviceClient(args.server, args.token, cache, certs, args.name, args.connect_timeout)
    try:
        client.run(read_text(args.data), args.max_tasks)
    except DeviceError as exc:
        print(f"fedtune device: error: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
