"""Between the round loop's Flower messages and the phones' protobuf tasks.

A train message to a phone becomes a :class:`~fedtune.ondevice.proto.device_pb2.Task`
(its instructions, the artifacts to download, the adapter's tensor specs; for FwdLLM's
probes, the directions, chosen here as a ClientApp would choose them); a phone's upload
becomes the reply a ClientApp would send (:class:`~fedtune.protocol.TrainReport`
metrics and the update encoded as ``client.wire_dtype``, or its seed steps), so the
loop's own validation, deadlines and events apply unchanged.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Message, RecordDict

from fedtune.engines import default_eps
from fedtune.ondevice.artifacts import NO_TRAINING_GRADIENT, ArtifactSet
from fedtune.ondevice.proto import device_pb2 as pb
from fedtune.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    GUIDE_KEY,
    LOSS_FIRST_KEY,
    LOSS_LAST_KEY,
    METRICS_KEY,
    SEEDS_KEY,
    TrainInstructions,
    TrainReport,
)
from fedtune.server.gateway.auth import Device
from fedtune.server.gateway.settings import ENGINE_ARTIFACTS
from fedtune.wire import encode_update, seeds_from_record, seeds_to_record

Arrays = dict[str, np.ndarray]


def check_phone_can_train(
    message: Message, asked: TrainInstructions, device: Device, artifacts: ArtifactSet | None
) -> None:
    """Refuse (ValueError, with the reason) what a phone cannot do with this message."""
    content = message.content
    if CONFIG_KEY not in content.config_records:
        raise ValueError("a train message needs a config record")
    if ARRAYS_KEY not in content.array_records and SEEDS_KEY not in content.array_records:
        raise ValueError("a train message needs the adapter (or seed steps to catch up)")
    engine = asked.engine_name
    if engine not in ENGINE_ARTIFACTS:
        raise ValueError(
            f"engine {engine!r} does not run on devices ({', '.join(ENGINE_ARTIFACTS)})"
        )
    if engine == "forward" and not asked.probes:
        raise ValueError(
            "engine 'forward' runs on devices only as FwdLLM's probes (strategy fwdllm): "
            "local forward-gradient steps need torch"
        )
    if engine not in device.capabilities.engines:
        raise ValueError(f"the device does not run engine {engine!r}")
    if asked.fresh:
        raise ValueError("FLoRA's fresh adapter (lora-fresh) is not supported on devices")
    if asked.train_only != "all":
        raise ValueError(f"training only LoRA {asked.train_only} is not supported on devices")
    if asked.local != "none":
        raise ValueError("client-kept LoRA factors (FedSA-LoRA) are not supported on devices")
    if asked.rank:
        raise ValueError(f"LoRA rank {asked.rank} differs from the artifacts' rank")
    if asked.proximal_mu > 0:
        raise ValueError("FedProx's proximal term is not supported on devices")
    if artifacts is None:
        raise ValueError("no on-device artifacts were built for this run")
    if any(name not in artifacts.files for name in ENGINE_ARTIFACTS[engine]):
        raise ValueError(f"engine {engine!r} has no artifacts here: {NO_TRAINING_GRADIENT}")


def probe_directions(
    asked: TrainInstructions, device: Device, arrays: Arrays, message: Message
) -> tuple[list[int], int]:
    """FwdLLM's directions for a phone's probes, and the candidates drawn: what a
    ClientApp serving the same client picks (:meth:`fedtune.engines.forward.ForwardEngine.
    probe`: :func:`~fedtune.engines.seeds.pick_directions` seeded with the client seed,
    discriminative from the message's guide), done here on the phone's behalf."""
    from fedtune.engines.seeds import combine, pick_directions, seed_pool

    client = asked.scenario.client
    pool = seed_pool(asked.scenario.run.seed, client.num_seeds)
    specs = [(k, tuple(arrays[k].shape)) for k in sorted(arrays) if "lora_" in k]
    record = message.content.array_records.get(GUIDE_KEY)
    steps = seeds_from_record(record) if record is not None else []
    guide = combine(steps, pool, specs) if steps and asked.guide_sigmas else None
    indices, drawn = pick_directions(
        np.random.default_rng(asked.client_seed(device.client_index)),
        asked.probes,
        pool,
        specs,
        guide,
        asked.guide_sigmas,
        asked.guide_tries,
    )
    if not indices:
        raise ValueError(
            f"no direction passed discriminative sampling in {asked.guide_tries} tries each "
            f"(guide-sigmas = {asked.guide_sigmas}): lower the strategy's guide_sigmas"
        )
    return indices, drawn


def probe_metrics(probes: int, candidates: int) -> dict[str, float]:
    """The metrics :meth:`~fedtune.engines.forward.ForwardEngine.probe` reports, for a
    phone's probes (two inferences each): Flower's FedAvg family aggregates metrics only
    when every reply has the same keys."""
    return {
        "forward-passes": float(2 * probes),
        "probes": float(probes),
        "candidates": float(candidates),
    }


def to_task(
    asked: TrainInstructions,
    device: Device,
    arrays: Arrays,
    adapter: pb.ArtifactRef,
    artifacts: ArtifactSet,
    graph_names: dict[str, str],
    deadline_seconds: float,
    probe_indices: Sequence[int] = (),
) -> pb.Task:
    """The phone's task for a train message (its adapter already a blob: ``adapter``;
    ``probe_indices``: a ``forward`` task's directions, :func:`probe_directions`)."""
    scenario = asked.scenario
    client = scenario.client
    engine = asked.engine_name
    refs = [
        pb.ArtifactRef(
            name=name, artifact_id=artifacts.files[name].sha256, size=artifacts.files[name].size
        )
        for name in ENGINE_ARTIFACTS[engine]
    ]
    return pb.Task(
        task_id=uuid.uuid4().hex,
        round=asked.round,
        config=pb.TrainConfig(
            engine=engine,
            lr=client.lr,
            local_steps=client.local_steps,
            batch_size=client.batch_size,
            seq_len=client.seq_len,
            seed=asked.client_seed(device.client_index),
            # Phones run ONNX graphs whose int8 weights make small steps noisy.
            eps=client.eps or default_eps("device"),
            run_seed=scenario.run.seed,
            num_seeds=client.num_seeds,
            probe_indices=list(probe_indices),
        ),
        artifacts=[*refs, adapter],
        adapter=[
            pb.TensorSpec(
                name=k,
                shape=list(arrays[k].shape),
                dtype=pb.DTYPE_FLOAT32,
                graph_name=graph_names[k],
            )
            for k in sorted(arrays)
        ],
        deadline_seconds=deadline_seconds,
    )


def to_reply(
    task: pb.Task,
    asked: TrainInstructions,
    device: Device,
    header: pb.UpdateHeader,
    arrays: Arrays | None,
    steps: list[tuple[int, float]] | None,
    reply_to: Message,
    extra: Mapping[str, float] | None = None,
) -> Message:
    """The reply a ClientApp would send for this upload (``extra``: the engine's own
    metrics, as a ClientApp's engine reports them)."""
    metrics = header.metrics
    report = TrainReport(
        num_examples=int(metrics.num_examples),
        loss=float(metrics.loss),
        compute_seconds=float(metrics.compute_seconds),
        cpu_seconds=float(metrics.cpu_seconds),
        peak_rss_mb=float(metrics.peak_rss_mb),
        client_index=device.client_index,
        round=int(task.round),
        extra={
            LOSS_FIRST_KEY: float(metrics.loss_first),
            LOSS_LAST_KEY: float(metrics.loss_last),
            **(extra or {}),
        },
    )
    if steps is not None:  # as a zeroth (or probing) ClientApp replies: the seed steps only
        payload = {SEEDS_KEY: seeds_to_record(steps)}
    else:
        import torch

        assert arrays is not None
        state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()}
        payload = {ARRAYS_KEY: encode_update(state, asked.scenario.client.wire_dtype)}
    return Message(RecordDict({**payload, METRICS_KEY: report.to_metrics()}), reply_to=reply_to)
