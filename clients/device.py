"""The reference device client: what an Android app does, in Python without torch or flwr.

``fedtune device --server HOST:PORT --token T --data FILE`` enrolls with a run's device
gateway (``fedtune.server.gateway``), checks in until the run is over, and for each
task downloads the artifacts it names (cached by sha256, a broken download resumed
from its offset), trains the global adapter on its own text with ONNX Runtime and
uploads the update (chunked, with an idempotency key, retried on a broken link).

It uses only grpcio, numpy, ``tokenizers`` and onnxruntime(-training): the engines are
``backprop`` (the ORT training artifacts, only ``lora_*`` trainable, AdamW) and
``zeroth`` (MeZO steps with FedKSeed's seed pool on the inference graph, which takes
the LoRA weights as inputs; ONNX Runtime inference only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedtune.metrics import peak_rss_mb
from fedtune.proto import device_pb2 as pb
from fedtune.proto import device_pb2_grpc
from fedtune.proto.tensors import from_bundle, to_bundle

PROTOCOL_VERSION = 1
UPLOAD_CHUNK = 1 << 20
RETRIES = 5
"""Attempts of a download or an upload over a broken link before giving up."""
ERROR_KEY = "fedtune-error-bin"
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


# ------------------------------------------------------------------ ONNX Runtime


def onnxruntime() -> Any:
    """``import onnxruntime`` without torch.

    onnxruntime-training's package init probes for its torch integration (ORTModule)
    and imports torch when it is installed; on a phone it is not. Where torch is
    installed but not yet imported (this workstation), the probe is made to fail as it
    would on a phone, and torch is importable again afterwards.
    """
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import onnxruntime as ort
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return ort


@dataclass
class TrainResult:
    """What local training produced."""

    arrays: dict[str, np.ndarray]
    num_examples: int
    losses: list[float]
    seconds: float
    steps: list[tuple[int, float]] | None = None
    """``zeroth``: (seed-pool index, scalar) per step, which is what is uploaded."""
    step_seconds: list[tuple[float, float]] = field(default_factory=list)
    """(wall, CPU) seconds of each local step, session set-up excluded (benchmarks)."""


def batch_order(num_chunks: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """Indices of ``steps`` batches: a seeded shuffle (numpy PCG64), epoch after epoch."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(rng.permutation(num_chunks).tolist())
    return [np.array(order[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]


def train_backprop(
    paths: dict[str, Path],
    adapter: dict[str, np.ndarray],
    specs: Sequence[pb.TensorSpec],
    chunks: np.ndarray,
    config: pb.TrainConfig,
) -> TrainResult:
    """AdamW on the LoRA weights with the ORT training artifacts (a fresh optimizer
    state each task, as the torch engine starts a fresh AdamW each round).

    It calls the training bindings that ``onnxruntime.training.api`` wraps: importing
    that package imports torch (its ``__init__`` loads the torch integrations)."""
    ort = onnxruntime()
    capi = ort.capi._pybind_state
    started = time.perf_counter()
    state = capi.load_checkpoint(str(paths["checkpoint"]))
    device = capi.OrtDevice(capi.OrtDevice.cpu(), capi.OrtDevice.default_memory(), 0)
    options = capi.SessionOptions()
    options.log_severity_level = 3  # errors only
    module = capi.Module(
        str(paths["training_model"]), state, str(paths["eval_model"]), device, options
    )
    # Parameters get their buffers when the module is built: set the adapter after.
    for spec in specs:
        value = ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(adapter[spec.name], dtype=np.float32)
        )
        state.copy_parameter_from(spec.graph_name, value._ortvalue)
    optimizer = capi.Optimizer(str(paths["optimizer_model"]), state, device, options)
    optimizer.set_learning_rate(float(config.lr))
    losses = []
    timings = []
    for index in batch_order(len(chunks), config.batch_size, config.local_steps, config.seed):
        wall, cpu = time.perf_counter(), time.process_time()
        input_ids = np.ascontiguousarray(chunks[index], dtype=np.int64)
        fetches = capi.OrtValueVector()
        module.train_step([input_ids, np.ones_like(input_ids), input_ids], fetches)
        losses.append(float(fetches[0].numpy()))
        optimizer.optimizer_step()
        module.lazy_reset_grad()
        timings.append((time.perf_counter() - wall, time.process_time() - cpu))
    arrays = {s.name: state.get_parameter(s.graph_name).data.numpy().copy() for s in specs}
    return TrainResult(
        arrays,
        config.local_steps * config.batch_size,
        losses,
        time.perf_counter() - started,
        step_seconds=timings,
    )


def seed_pool(run_seed: int, k: int) -> list[int]:
    """The run's K perturbation seeds: must equal ``fedtune.engines.seeds.seed_pool``."""
    return [int(s) for s in np.random.SeedSequence(run_seed).generate_state(k, dtype=np.uint32)]


def perturbation(seed: int, specs: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """``z(seed)``: ±1 per value from PCG64's raw bits, little-endian, over ``specs`` in
    order. Must equal ``fedtune.engines.seeds.perturbation`` bit for bit (a test checks)."""
    sizes = [math.prod(shape) for _, shape in specs]
    words = np.random.PCG64(seed).random_raw(-(-sum(sizes) // 64))
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")
    signs = bits[: sum(sizes)].astype(np.float32) * 2.0 - 1.0
    out, start = {}, 0
    for (name, shape), size in zip(specs, sizes, strict=True):
        out[name] = signs[start : start + size].reshape(shape)
        start += size
    return out


def train_zeroth(
    paths: dict[str, Path],
    adapter: dict[str, np.ndarray],
    specs: Sequence[pb.TensorSpec],
    chunks: np.ndarray,
    config: pb.TrainConfig,
) -> TrainResult:
    """MeZO two-point steps with FedKSeed's seed pool on the inference graph:
    ``g = (L(w + eps z) - L(w - eps z)) / 2 eps``, ``w <- w - lr g z``."""
    ort = onnxruntime()
    started = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(paths["inference_model"]), options, providers=["CPUExecutionProvider"]
    )
    master = {s.name: np.array(adapter[s.name], dtype=np.float32) for s in specs}
    graph = {s.name: s.graph_name for s in specs}
    keys = sorted(k for k in master if "lora_" in k)
    shapes = [(k, tuple(master[k].shape)) for k in keys]
    pool = seed_pool(config.run_seed, config.num_seeds)
    picks = np.random.default_rng(config.seed).integers(config.num_seeds, size=config.local_steps)
    eps = float(config.eps)
    losses: list[float] = []
    steps: list[tuple[int, float]] = []
    timings: list[tuple[float, float]] = []

    def loss_at(weights: dict[str, np.ndarray], input_ids: np.ndarray) -> float:
        feed = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}
        feed["labels"] = input_ids
        feed.update({graph[k]: v for k, v in weights.items()})
        return float(session.run(["loss"], feed)[0])

    batches = batch_order(len(chunks), config.batch_size, config.local_steps, config.seed)
    for index, pick in zip(batches, picks.tolist(), strict=True):
        wall, cpu = time.perf_counter(), time.process_time()
        input_ids = np.ascontiguousarray(chunks[index], dtype=np.int64)
        z = perturbation(pool[pick], shapes)
        plus = loss_at({k: master[k] + np.float32(eps) * z[k] for k in keys}, input_ids)
        minus = loss_at({k: master[k] - np.float32(eps) * z[k] for k in keys}, input_ids)
        scalar = float(np.float32((plus - minus) / (2 * eps)))  # as it travels
        step = np.float32(config.lr * scalar)  # the server's replay rounds the same way
        for key in keys:
            master[key] = (master[key] - step * z[key]).astype(np.float32)
        losses.append((plus + minus) / 2)
        steps.append((int(pick), scalar))
        timings.append((time.perf_counter() - wall, time.process_time() - cpu))
    return TrainResult(
        master,
        config.local_steps * config.batch_size,
        losses,
        time.perf_counter() - started,
        steps,
        timings,
    )


ENGINES = {"backprop": train_backprop, "zeroth": train_zeroth}


def read_text(path: Path) -> str:
    """A device's own text: a plain file, or JSONL whose lines have a ``text`` field."""
    if path.suffix == ".jsonl":
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return "\n".join(str(item["text"]) for item in lines)
    return path.read_text()


def chunk_text(tokenizer_file: Path, text: str, seq_len: int) -> np.ndarray:
    """Tokenize ``text`` (no special tokens) into non-overlapping ``seq_len`` chunks."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text, add_special_tokens=False).ids
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the data holds {len(ids)} tokens, fewer than seq_len = {seq_len}")
    return np.array(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


# ------------------------------------------------------------------ the protocol


def capabilities() -> pb.Capabilities:
    ort = onnxruntime()
    runtimes = ["onnxruntime"]
    if hasattr(ort.capi._pybind_state, "Module"):
        runtimes.insert(0, "onnxruntime-training")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    engines = ["backprop", "zeroth"] if "onnxruntime-training" in runtimes else ["zeroth"]
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
        identity.write_text(
            json.dumps(
                {
                    "device_id": self.device_id,
                    "credential": self.credential,
                    "token": hashlib.sha256(self.token.encode()).hexdigest(),
                }
            )
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
        """Upload an update (or, for ``zeroth``, only its seed ``steps``); a broken link
        is retried with the same idempotency key."""
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

    def run_task(self, task: pb.Task, text: str) -> pb.SubmitUpdateResponse:
        """Download, train, submit: one task."""
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
            answer = self.run_task(task, text)
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
