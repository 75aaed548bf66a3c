"""On-device training engines: numpy and ONNX Runtime only (no torch, no flwr).

What a phone runs for a task, shared by the reference device client
(``fedtune.clients.device``) and the device benchmark: ``backprop`` (the ORT training
artifacts, only ``lora_*`` trainable, AdamW), ``zeroth`` (MeZO steps with FedKSeed's
seed pool on the inference graph, which takes the LoRA weights as inputs; ONNX Runtime
inference only) and ``forward`` (FwdLLM's probes: the same two-point differences at the
adapter received, along the pool directions the server chose, and no step).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.ondevice.proto import device_pb2 as pb


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


@dataclass(frozen=True)
class SessionSettings:
    """ONNX Runtime session options of the device engines (docs/android.md lists them).

    The defaults are what a phone should use; the device benchmark turns each off to
    measure what it saves."""

    arena: bool = False
    """CPU memory arena: it keeps the step's peak allocation reserved for the session."""
    memory_pattern: bool = False
    """Pre-planned activation blocks: one allocation the size of all of a step's tensors."""
    memory_reuse: bool = False
    """Training session only: ONNX Runtime's planner lets a tensor take over the buffer of
    an earlier, dead tensor of the same size, and the buffer then stays allocated from
    the first tensor's birth to the last one's death. In a training graph a forward
    buffer handed on to a backward tensor holds its memory through the whole step:
    every activation's buffer was held until the backward (SmolLM2-135M, int8
    artifacts: 1,693 MiB with reuse, 636 without)."""
    optimize_training: bool = False
    """Graph optimizations in the training session: constant folding would turn the int8
    weights back into fp32 initializers and common-subexpression elimination would merge
    the recomputed nodes of the backward pass with their forward twins (the artifacts
    were optimized when they were built)."""
    spinning: bool = False
    """Intra-op threads busy-wait for work between operators (ONNX Runtime's default):
    CPU (and a phone's battery) spent waiting, and on a busy CPU taken from the thread
    that works. The per-layer recomputation doubles the number of small operators, and
    with spinning on the int8 training step cost 1.72x fp32's CPU, 1.17x without
    (same process, 2 shared cores)."""
    threads: int = 0
    """Intra-op threads (0: ONNX Runtime's default, one per core)."""
    mmap_threshold: int = 64 << 10
    """Linux/glibc only (the Python reference client; Android's allocator differs):
    blocks from this size up are mapped and unmapped one by one, so memory freed by
    the session (the parsed model, the unpacked weights) returns to the system.
    glibc's default threshold grows with the blocks freed (up to 32 MiB) and then keeps
    them in its heap: without this, the device process holds ~300 MiB more. 0: leave
    the allocator alone."""

    def apply(self, options: Any, training: bool) -> Any:
        if self.mmap_threshold and sys.platform == "linux":
            import ctypes

            try:
                ctypes.CDLL("libc.so.6").mallopt(-3, self.mmap_threshold)  # M_MMAP_THRESHOLD
            except OSError:  # not glibc
                pass
        options.enable_cpu_mem_arena = self.arena
        options.enable_mem_pattern = self.memory_pattern
        if training:
            options.enable_mem_reuse = self.memory_reuse
        if training and not self.optimize_training:
            level = onnxruntime().GraphOptimizationLevel.ORT_DISABLE_ALL
            options.graph_optimization_level = level
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.threads:
            options.intra_op_num_threads = self.threads
        return options


PHONE = SessionSettings()


@dataclass
class TrainResult:
    """What local training produced."""

    arrays: dict[str, np.ndarray]
    num_examples: int
    losses: list[float]
    seconds: float
    steps: list[tuple[int, float]] | None = None
    """``zeroth``: (seed-pool index, scalar) per step; ``forward``: (index, directional
    derivative) per probe. What is uploaded (no tensors)."""
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
    settings: SessionSettings = PHONE,
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
    options = settings.apply(capi.SessionOptions(), training=True)
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


class InferenceLoss:
    """The inference graph's ``loss`` on a batch at given LoRA weights (ORT inference)."""

    def __init__(
        self, path: Path, specs: Sequence[pb.TensorSpec], settings: SessionSettings = PHONE
    ) -> None:
        ort = onnxruntime()
        options = settings.apply(ort.SessionOptions(), training=False)
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.graph = {s.name: s.graph_name for s in specs}

    def __call__(self, weights: dict[str, np.ndarray], input_ids: np.ndarray) -> float:
        feed = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}
        feed["labels"] = input_ids
        feed.update({self.graph[k]: v for k, v in weights.items()})
        return float(self.session.run(["loss"], feed)[0])

    def two_point(
        self,
        weights: dict[str, np.ndarray],
        z: dict[str, np.ndarray],
        eps: float,
        input_ids: np.ndarray,
    ) -> tuple[float, float]:
        """``(L(w + eps z), L(w - eps z))``, ``w ± eps z`` in fp32, only the keys of ``z``
        moved; the step ``g = float32((plus - minus) / (2 eps))`` is the caller's."""
        step = np.float32(eps)
        plus = self({**weights, **{k: weights[k] + step * z[k] for k in z}}, input_ids)
        minus = self({**weights, **{k: weights[k] - step * z[k] for k in z}}, input_ids)
        return plus, minus


def lora_shapes(weights: dict[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors a direction covers: every ``lora_`` tensor, in sorted-name order."""
    return [(k, tuple(weights[k].shape)) for k in sorted(weights) if "lora_" in k]


def train_zeroth(
    paths: dict[str, Path],
    adapter: dict[str, np.ndarray],
    specs: Sequence[pb.TensorSpec],
    chunks: np.ndarray,
    config: pb.TrainConfig,
    settings: SessionSettings = PHONE,
) -> TrainResult:
    """MeZO two-point steps with FedKSeed's seed pool on the inference graph:
    ``g = (L(w + eps z) - L(w - eps z)) / 2 eps``, ``w <- w - lr g z``."""
    started = time.perf_counter()
    loss = InferenceLoss(paths["inference_model"], specs, settings)
    master = {s.name: np.array(adapter[s.name], dtype=np.float32) for s in specs}
    shapes = lora_shapes(master)
    pool = seed_pool(config.run_seed, config.num_seeds)
    picks = np.random.default_rng(config.seed).integers(config.num_seeds, size=config.local_steps)
    eps = float(config.eps)
    losses: list[float] = []
    steps: list[tuple[int, float]] = []
    timings: list[tuple[float, float]] = []
    batches = batch_order(len(chunks), config.batch_size, config.local_steps, config.seed)
    for index, pick in zip(batches, picks.tolist(), strict=True):
        wall, cpu = time.perf_counter(), time.process_time()
        input_ids = np.ascontiguousarray(chunks[index], dtype=np.int64)
        z = perturbation(pool[pick], shapes)
        plus, minus = loss.two_point(master, z, eps, input_ids)
        scalar = float(np.float32((plus - minus) / (2 * eps)))  # as it travels
        step = np.float32(config.lr * scalar)  # the server's replay rounds the same way
        for key in z:
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


def probe_plan(config: pb.TrainConfig, num_chunks: int) -> list[tuple[int, np.ndarray]]:
    """A ``forward`` task's probes in order: ``(pool index, chunk indices of its batch)``.

    The ``p``-th entry of ``config.probe_indices`` takes batch ``p`` of the zeroth
    engine's rule (:func:`batch_order` seeded with ``config.seed``); an index may repeat
    (then on another batch)."""
    indices = [int(j) for j in config.probe_indices]
    if not indices:
        raise ValueError("a forward task names no probe_indices")
    if any(j >= config.num_seeds for j in indices):
        raise ValueError(f"a probe index is outside the seed pool of {config.num_seeds}")
    batches = batch_order(num_chunks, config.batch_size, len(indices), config.seed)
    return list(zip(indices, batches, strict=True))


def probe_forward(
    paths: dict[str, Path],
    adapter: dict[str, np.ndarray],
    specs: Sequence[pb.TensorSpec],
    chunks: np.ndarray,
    config: pb.TrainConfig,
    settings: SessionSettings = PHONE,
) -> TrainResult:
    """FwdLLM's probes on the inference graph: ``(L(w + eps z_j) - L(w - eps z_j)) / 2 eps``
    at the adapter received for each ``(j, batch)`` of :func:`probe_plan`; no step.

    :attr:`TrainResult.steps` is ``(j, derivative)`` per probe, in the task's order —
    the upload; :attr:`TrainResult.arrays` is the adapter unchanged."""
    plan = probe_plan(config, len(chunks))
    started = time.perf_counter()
    loss = InferenceLoss(paths["inference_model"], specs, settings)
    weights = {s.name: np.array(adapter[s.name], dtype=np.float32) for s in specs}
    shapes = lora_shapes(weights)
    pool = seed_pool(config.run_seed, config.num_seeds)
    eps = float(config.eps)
    losses: list[float] = []
    steps: list[tuple[int, float]] = []
    timings: list[tuple[float, float]] = []
    for j, batch in plan:
        wall, cpu = time.perf_counter(), time.process_time()
        input_ids = np.ascontiguousarray(chunks[batch], dtype=np.int64)
        plus, minus = loss.two_point(weights, perturbation(pool[j], shapes), eps, input_ids)
        steps.append((j, float(np.float32((plus - minus) / (2 * eps)))))  # as it travels
        losses.append((plus + minus) / 2)
        timings.append((time.perf_counter() - wall, time.process_time() - cpu))
    return TrainResult(
        weights,
        len(plan) * config.batch_size,
        losses,
        time.perf_counter() - started,
        steps,
        timings,
    )


ENGINES = {"backprop": train_backprop, "zeroth": train_zeroth, "forward": probe_forward}


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
