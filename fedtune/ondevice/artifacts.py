"""On-device artifacts of a run: ONNX Runtime training artifacts and an inference graph.

A phone cannot run torch; it runs ONNX Runtime. For a run's base model and LoRA
configuration this module builds, once:

- the **training artifacts** of ``onnxruntime.training.artifacts.generate_artifacts``
  (training, eval and optimizer models and a checkpoint) in which only the ``lora_*``
  weights are trainable; the graph computes the model's own causal-LM loss from
  ``input_ids``, ``attention_mask`` and ``labels``, and AdamW (torch's defaults, the
  scenario's weight decay) updates the LoRA weights — what the ``backprop`` engine does;
- an **inference graph** whose LoRA weights are graph *inputs* (loss out), for
  zeroth-order devices that have only ONNX Runtime inference;
- the tokenizer as ``tokenizer.json`` (the ``tokenizers`` format).

The base is exported in fp32 whatever ``model.quantization`` says: the artifacts are
what a phone trains, and the server's adapter fits both. ``int8`` (``gateway.artifact_int8``)
then optionally stores the *frozen* weights in int8, never a ``lora_*`` tensor:

- ``"weights"``: every frozen 2-D weight (decoder projections, embedding, LM head)
  becomes int8 with one fp32 scale per output channel (symmetric, zero point 0) and a
  ``DequantizeLinear`` in front of its use, in the training artifacts and the inference
  graph. The arithmetic stays fp32, so ORT training differentiates through it as before;
  files and checkpoint shrink, a session's peak memory does not (it dequantizes).
- ``"dynamic"``: the inference graph only, through ``onnxruntime.quantization.
  quantize_dynamic`` (``DynamicQuantizeLinear`` + ``MatMulInteger``: int8 arithmetic,
  activations quantized per call), the embedding as in ``"weights"``. ORT training has
  no gradient for ``DynamicQuantizeLinear``, so no training artifacts are built and only
  ``zeroth`` phones can be served; its loss is not smooth at small scales (use
  ``client.eps`` >= 1e-2). Everything is
cached under ``$FEDTUNE_CACHE/artifacts/<key>``, where the key hashes every input of
the build, and each file is named to devices by the sha256 of its bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.config import LoraConfig

ADAPTER_NAME = "default"
"""PEFT's adapter name: it appears in parameter names, not in adapter keys."""
OPSET = 17
TRAINING_FILES = {
    "training_model": "training_model.onnx",
    "eval_model": "eval_model.onnx",
    "optimizer_model": "optimizer_model.onnx",
    "checkpoint": "checkpoint",
}
INFERENCE_FILE = "inference_model.onnx"
TRAINING_LOSS_CHUNKS = 8
"""Token slices of the training graph's loss: a slice's logits live only while its
loss and, recomputed, its gradient are computed."""
INFERENCE_LOSS_CHUNKS = 8
"""Token slices of the quantized inference graphs' loss. Each slice's head is its own
node, and ONNX Runtime prepacks a constant weight once per node: more slices mean
smaller logits but more packed copies of a 4-bit head (~17 MB each for SmolLM2's
``MatMulNBits``), and of an fp32 one 113 MB each, so the fp32 graph keeps one."""
TOKENIZER_FILE = "tokenizer.json"
MANIFEST = "manifest.json"
FORMAT_VERSION = 6
"""Bumped whenever the build changes what it writes (part of the cache key).
2: chunked loss in both graphs, recomputation in the training graph, ``int4``.
3: ``int4``'s inference graph keeps the LM head in int8 (vocabulary chunks).
5: the int8 training graph too (head in vocabulary blocks), its backward
re-dequantizes the decoder's weights (graph inputs there) and starts after the
forward loss.
6: format 5's training graph only for a head above :data:`TRAINING_HEAD_BLOCKS_MB`;
a smaller head gets format 3's (SmolLM2-135M: same peak, 0.8x the CPU a step)."""
TRAINING_HEAD_BLOCKS_MB = 256.0
"""The int8 training graph keeps the LM head in int8 vocabulary blocks
(:func:`quantize_head_int8`) only when the head's fp32 copy would be larger than this
(Gemma-3-270M's: 671 MB); a smaller head is dequantized whole, once a pass (SmolLM2-135M's:
113 MB, not at the step's peak: 635 vs 633 MiB). Blocks are dequantized again for every
loss slice: with them SmolLM2's int8 step took 1.2x the CPU (benchmarks/RESULTS.md)."""
INT8_MODES = ("none", "weights", "dynamic", "int4")
"""Values of ``int8`` (``gateway.artifact_int8``): how the frozen weights are stored."""
NO_TRAINING_GRADIENT = (
    "ONNX Runtime training has no gradient for DynamicQuantizeLinear/MatMulInteger, so "
    "artifact_int8 = 'dynamic' builds no training artifacts and serves only the inference "
    "engines 'zeroth' and 'forward' (probes); use artifact_int8 = 'weights' (int8 storage, "
    "fp32 arithmetic) for backprop"
)


@dataclass(frozen=True)
class ArtifactFile:
    """One file of an artifact set, as devices see it."""

    name: str
    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class AdapterTensor:
    """One LoRA tensor: its adapter key, shape, and name in the ONNX graphs."""

    key: str
    shape: tuple[int, ...]
    graph_name: str


@dataclass(frozen=True)
class ArtifactSet:
    """The built artifacts of one (model, LoRA, optimizer) configuration."""

    folder: Path
    files: dict[str, ArtifactFile]
    adapter: tuple[AdapterTensor, ...]

    def file(self, name: str) -> ArtifactFile:
        return self.files[name]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(
    model_name: str,
    num_layers: int,
    lora: LoraConfig,
    weight_decay: float,
    int8: str = "none",
    head_blocks: bool | None = None,
) -> str:
    """A hash of everything the build depends on (model identity, LoRA, int8, versions)."""
    import onnxruntime
    import torch

    identity: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model": model_name,
        "num_layers": num_layers,
        "lora": [lora.r, lora.alpha, lora.dropout, list(lora.targets)],
        "weight_decay": weight_decay,
        "opset": OPSET,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    if int8 != "none":  # fp32 builds keep the keys they had before int8 existed
        identity["int8"] = int8
    if head_blocks is not None:  # as for int8: the default's keys stay as they were
        identity["head_blocks"] = head_blocks
    folder = Path(model_name).expanduser()
    if folder.is_dir():  # a local model folder: its files' sizes and times identify it
        identity["files"] = sorted(
            (p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir()
        )
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def lora_graph_names(model: Any) -> dict[str, str]:
    """Adapter key -> parameter name of every LoRA weight of a PEFT model."""
    names = {}
    for name, _ in model.named_parameters():
        if "lora_" in name:
            names[name.replace(f".{ADAPTER_NAME}", "")] = name
    return names


def build_artifacts(
    model_name: str,
    num_layers: int,
    lora: LoraConfig,
    weight_decay: float = 0.0,
    cache: Path | None = None,
    int8: str = "none",
    trust_remote_code: bool = False,
    head_blocks: bool | None = None,
) -> ArtifactSet:
    """Build (or find in the cache) the artifact set of a model and LoRA configuration.

    ``int8`` is one of :data:`INT8_MODES` (see the module docstring); with ``"dynamic"``
    the set holds no training artifacts. ``trust_remote_code`` is the run's
    ``model.trust_remote_code``: a folder with its own model code loads only with it.
    ``head_blocks`` decides whether an int8 training graph keeps the LM head in
    vocabulary blocks (default: by size, :data:`TRAINING_HEAD_BLOCKS_MB`)."""
    from fedtune.models.base import _convert_once, cache_dir

    if int8 not in INT8_MODES:
        raise ValueError(f"int8 must be one of {INT8_MODES}, got {int8!r}")
    root = Path(cache) if cache is not None else cache_dir() / "artifacts"
    folder = root / cache_key(model_name, num_layers, lora, weight_decay, int8, head_blocks)

    def write(tmp: Path) -> None:
        _export_all(
            model_name, num_layers, lora, weight_decay, tmp, int8, trust_remote_code, head_blocks
        )

    _convert_once(folder, write)
    return load_artifacts(folder)


def load_artifacts(folder: Path) -> ArtifactSet:
    """The artifact set of a built folder (from its manifest)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    files = {
        name: ArtifactFile(name, folder / entry["file"], entry["sha256"], entry["size"])
        for name, entry in manifest["files"].items()
    }
    adapter = tuple(
        AdapterTensor(t["key"], tuple(t["shape"]), t["graph_name"]) for t in manifest["adapter"]
    )
    return ArtifactSet(folder, files, adapter)


def _export_all(
    model_name: str,
    num_layers: int,
    lora: LoraConfig,
    weight_decay: float,
    out: Path,
    int8: str,
    trust_remote_code: bool = False,
    head_blocks: bool | None = None,
) -> None:
    import time

    import onnxruntime
    import torch

    from fedtune.models import attach_lora, load_base_model, load_tokenizer

    onnxruntime.set_default_logger_severity(3)  # the artifact build logs every graph pass
    base = load_base_model(model_name, "fp32", num_layers, "none", trust_remote_code)
    model = attach_lora(base, lora, seed=0)
    model.eval()
    graph_names = lora_graph_names(model)
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters() if "lora_" in k}
    example = torch.zeros((2, 16), dtype=torch.long)
    seconds: dict[str, float] = {}
    files = {"inference_model": INFERENCE_FILE, "tokenizer": TOKENIZER_FILE}
    if int8 != "dynamic":
        started = time.perf_counter()
        quantized = int8 in ("weights", "int4")  # no gradient for MatMulNBits: int8 there
        _export_training(model, graph_names, weight_decay, example, out, quantized, head_blocks)
        seconds["training"] = round(time.perf_counter() - started, 2)
        files.update(TRAINING_FILES)
    started = time.perf_counter()
    _export_inference(model, graph_names, example, out / INFERENCE_FILE, int8)
    seconds["inference"] = round(time.perf_counter() - started, 2)
    tokenizer = load_tokenizer(model_name)
    (out / TOKENIZER_FILE).write_text(tokenizer.backend_tokenizer.to_str())

    manifest = {
        "format": FORMAT_VERSION,
        "model": model_name,
        "int8": int8,
        "build_seconds": seconds,
        "files": {
            name: {
                "file": file,
                "sha256": sha256_file(out / file),
                "size": (out / file).stat().st_size,
            }
            for name, file in files.items()
        },
        "adapter": [
            {
                "key": key,
                "shape": list(shapes[graph_names[key]]),
                "graph_name": PREFIX + graph_names[key],
            }
            for key in sorted(graph_names)
        ],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


class _LossOf:
    """Factory of the torch modules that are exported (kept out of module scope, so
    importing this file does not import torch)."""

    @staticmethod
    def training(model: Any) -> Any:
        import torch

        from fedtune.engines.loss import causal_lm_loss

        class Training(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
                return causal_lm_loss(
                    self.model,
                    input_ids,
                    attention_mask,
                    labels,
                    TRAINING_LOSS_CHUNKS,
                    recompute=False,
                )

        return Training()

    @staticmethod
    def inference(model: Any, graph_names: dict[str, str], chunks: int) -> Any:
        """The loss with every LoRA weight taken from an input: the LoRA Parameters are
        removed and the inputs assigned in their place on each call (FACTS.md; the
        stateless API cannot be traced)."""
        import torch

        from fedtune.engines.loss import causal_lm_loss

        keys = sorted(graph_names)
        owners = []
        for key in keys:
            path, attr = graph_names[key].rsplit(".", 1)
            owners.append((model.get_submodule(path), attr))

        class Inference(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model
                for module, attr in owners:
                    del module._parameters[attr]

            def forward(self, input_ids: Any, attention_mask: Any, labels: Any, *lora: Any) -> Any:
                for (module, attr), weight in zip(owners, lora, strict=True):
                    setattr(module, attr, weight)
                return causal_lm_loss(
                    self.model,
                    input_ids,
                    attention_mask,
                    labels,
                    chunks,
                    recompute=False,
                )

        return Inference()


DYNAMIC = {name: {0: "batch", 1: "seq"} for name in ("input_ids", "attention_mask", "labels")}
PREFIX = "model."
"""The exported wrapper holds the PEFT model as ``model``: graph names get this prefix."""


def _export_training(
    model: Any,
    graph_names: dict[str, str],
    weight_decay: float,
    example: Any,
    out: Path,
    int8: bool = False,
    head_blocks: bool | None = None,
) -> None:
    import onnx
    import torch
    from onnxruntime.training import artifacts as ort_artifacts
    from onnxruntime.training.onnxblock.optim import AdamW

    wrapper = _LossOf.training(model)
    onnx_path = out / "exported.onnx"
    # FACTS.md: TorchScript export in training mode without constant folding keeps the
    # parameter names; the all-ones mask avoids aten::diff, which opset 17 lacks.
    torch.onnx.export(
        wrapper,
        (example, torch.ones_like(example), example),
        str(onnx_path),
        input_names=["input_ids", "attention_mask", "labels"],
        output_names=["loss"],
        dynamic_axes=DYNAMIC,
        opset_version=OPSET,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.TRAINING,
        dynamo=False,
    )
    exported = onnx.load(str(onnx_path))
    initializers = {i.name for i in exported.graph.initializer}
    trainable = sorted(PREFIX + n for n in graph_names.values())
    missing = [n for n in trainable if n not in initializers]
    if missing:
        raise RuntimeError(f"LoRA weights lost in the ONNX export: {missing[:3]}")
    if int8:
        if head_blocks is None:
            head = model.get_output_embeddings()
            head_mb = head.weight.numel() * 4 / 1e6 if head is not None else 0.0
            head_blocks = head_mb > TRAINING_HEAD_BLOCKS_MB
        if head_blocks:
            quantize_head_int8(exported)  # before the rest: it reads the fp32 head
        quantize_frozen_weights(exported)
        quantize_embedding_rows(exported)
        initializers = {i.name for i in exported.graph.initializer}
    frozen = sorted(initializers - set(trainable))
    logging.getLogger(__name__).info("ORT artifacts: %d trainable tensors", len(trainable))
    ort_artifacts.generate_artifacts(
        exported,
        requires_grad=trainable,
        frozen_params=frozen,
        loss=None,  # the graph's output already is the loss
        optimizer=AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay),
        artifact_directory=str(out),
    )
    onnx_path.unlink()
    training = onnx.load(str(out / TRAINING_FILES["training_model"]))
    # Format 5's two other rewrites go with the head's blocks: with a whole head,
    # re-running the weights' dequantizations in the backward dequantizes and transposes
    # it a second time, and gating the backward on the loss keeps it longer (SmolLM2-135M
    # int8 peaks: 752 and 754 MiB against 635 without either, benchmarks/RESULTS.md).
    blocks = bool(int8 and head_blocks)
    recompute_in_backward(training, weights=blocks)
    if blocks:
        backward_after_loss(training)
    onnx.save(training, str(out / TRAINING_FILES["training_model"]))


def _export_inference(
    model: Any, graph_names: dict[str, str], example: Any, path: Path, int8: str = "none"
) -> None:
    import onnx
    import torch

    keys = sorted(graph_names)
    params = dict(model.named_parameters())
    lora = tuple(params[graph_names[k]].detach().clone() for k in keys)
    torch.onnx.export(
        # fp32: the model's own loss. The head is then one fp32 MatMul with a constant B,
        # which ONNX Runtime prepacks once per node: 8 slices would hold 8 packed copies
        # of the 113 MB head (measured: peak 1,492 -> 2,058 MiB).
        _LossOf.inference(model, graph_names, 1 if int8 == "none" else INFERENCE_LOSS_CHUNKS),
        (example, torch.ones_like(example), example, *lora),
        str(path),
        input_names=[
            "input_ids",
            "attention_mask",
            "labels",
            *(PREFIX + graph_names[k] for k in keys),
        ],
        output_names=["loss"],
        dynamic_axes=DYNAMIC,
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )
    if int8 in ("weights", "int4"):
        graph = onnx.load(str(path))
        if int8 == "int4":
            quantize_head_int8(graph)
            quantize_matmuls_4bit(graph)
        quantize_frozen_weights(graph)  # what is left: the embedding table
        quantize_embedding_rows(graph)
        onnx.save(graph, str(path))
    elif int8 == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Only MatMuls with a constant B: the LoRA weights are graph inputs, so they and
        # the attention products stay fp32; the embedding's Gather is left to the pass below.
        quantize_dynamic(
            path,
            path,
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
        graph = onnx.load(str(path))
        quantize_frozen_weights(graph)
        quantize_embedding_rows(graph)
        onnx.save(graph, str(path))


def quantize_frozen_weights(graph: Any) -> list[str]:
    """Store every float32 2-D initializer but the ``lora_*`` ones as int8 (in place).

    Symmetric per output channel: ``q = round(w / s)`` in [-127, 127] with
    ``s = max|w| / 127`` per channel, and ``DequantizeLinear(q, s)`` under the old
    name, so every consumer is unchanged. The channel axis is 1 for the B input of a
    MatMul (``[in, out]``) and 0 otherwise (torch's ``[out, in]`` under a Transpose,
    an embedding's rows). Returns the names quantized.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    column = {n.input[1] for n in graph.graph.node if n.op_type == "MatMul" and len(n.input) > 1}
    kept: list[Any] = []
    added: list[Any] = []
    names: list[str] = []
    for tensor in graph.graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or len(tensor.dims) != 2 or "lora_" in tensor.name:
            kept.append(tensor)
            continue
        weight = numpy_helper.to_array(tensor)
        axis = 1 if tensor.name in column else 0
        scale = np.abs(weight).max(axis=1 - axis) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        shaped = scale.reshape((1, -1) if axis == 1 else (-1, 1))
        q = np.clip(np.rint(weight / shaped), -127, 127).astype(np.int8)
        kept.append(numpy_helper.from_array(q, f"{tensor.name}_int8"))
        kept.append(numpy_helper.from_array(scale, f"{tensor.name}_scale"))
        # An explicit int8 zero point: without one, ORT training's graph passes insert a
        # QuantizeLinear typed uint8 and the training Module fails to load.
        kept.append(numpy_helper.from_array(np.zeros_like(scale, np.int8), f"{tensor.name}_zero"))
        added.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{tensor.name}_int8", f"{tensor.name}_scale", f"{tensor.name}_zero"],
                [tensor.name],
                name=f"{tensor.name}_dequantize",
                axis=axis,
            )
        )
        names.append(tensor.name)
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    # Each dequantization just before its first use: ONNX Runtime's priority-based order
    # runs ready nodes by their place in the graph, and a block of them at the top would
    # expand every layer's weight to fp32 before the first layer runs.
    pending = {n.output[0]: n for n in added}
    nodes: list[Any] = []
    for node in graph.graph.node:
        nodes += [pending.pop(i) for i in node.input if i in pending]
        nodes.append(node)
    nodes += pending.values()
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    return names


def _int8_rows(weight: Any) -> tuple[Any, Any]:
    """Symmetric int8 per row: ``(q, scale)`` with ``weight ~ q * scale[:, None]``."""
    import numpy as np

    scale = np.abs(weight).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def quantize_embedding_rows(graph: Any) -> int:
    """Gathers from a dequantized table (the token embedding) read int8 rows instead.

    ``Gather(q, ids) * Gather(scale, ids)`` for a ``DequantizeLinear(q, scale)`` per row
    (what :func:`quantize_frozen_weights` writes, axis 0): only the looked-up rows
    become fp32. Dequantizing first makes the whole 49,152-row table fp32 on every call
    (113 MB for SmolLM2), which is what held the inference graph's memory; ONNX Runtime
    1.19 has no quantized Gather (GatherBlockQuantized came later). Run after
    :func:`quantize_frozen_weights`; returns the Gathers rewritten.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    dequantized = {
        n.output[0]: n
        for n in graph.graph.node
        if n.op_type == "DequantizeLinear"
        and any(a.name == "axis" and a.i == 0 for a in n.attribute)
    }
    nodes: list[Any] = []
    count = 0
    for node in graph.graph.node:
        source = dequantized.get(node.input[0]) if node.op_type == "Gather" else None
        if source is None or any(a.name == "axis" and a.i != 0 for a in node.attribute):
            nodes.append(node)
            continue
        q_name, s_name = source.input[0], source.input[1]
        out, ids, tag = node.output[0], node.input[1], node.name or node.output[0]
        nodes += [
            helper.make_node("Gather", [q_name, ids], [f"{out}_q"], name=f"{tag}_q", axis=0),
            helper.make_node("Cast", [f"{out}_q"], [f"{out}_f"], name=f"{tag}_cast", to=1),
            helper.make_node("Gather", [s_name, ids], [f"{out}_s"], name=f"{tag}_s", axis=0),
            helper.make_node(
                "Unsqueeze", [f"{out}_s", f"{tag}_axes"], [f"{out}_s1"], name=f"{tag}_unsq"
            ),
            helper.make_node("Mul", [f"{out}_f", f"{out}_s1"], [out], name=f"{tag}_scale"),
        ]
        graph.graph.initializer.append(numpy_helper.from_array(np.array([-1]), f"{tag}_axes"))
        count += 1
    _drop_unused(graph, nodes)
    return count


def quantize_matmuls_4bit(graph: Any, block_size: int = 32) -> list[str]:
    """Every ``MatMul`` with a constant fp32 ``[K, N]`` B becomes ONNX Runtime's
    ``com.microsoft.MatMulNBits`` (4 bits, blocks of ``block_size`` along K, a scale
    and a float zero point per block): weights stay 4-bit in memory and are dequantized
    block by block inside the kernel.

    Hand-written packing because onnxruntime-training 1.19's wheel lacks the
    ``quantize_matmul_4bits`` binding that ``MatMul4BitsQuantizer`` calls; the layout
    is the operator's (``B`` ``[N, K/block, block/2]`` uint8, low nibble first).
    Asymmetric blocks of 32 fit SmolLM2's GGUF Q4_1 grid (blocks of 32, scale + min).
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = {
        t.name: t
        for t in graph.graph.initializer
        if t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and "lora_" not in t.name
    }
    nodes: list[Any] = []
    names: list[str] = []
    packed_of: dict[str, str] = {}
    for node in graph.graph.node:
        b = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        dims = weights[b].dims if b in weights else ()
        if not dims or dims[0] % block_size:
            nodes.append(node)
            continue
        k, n = dims
        if b in packed_of:  # one packed copy per weight, however many MatMuls read it
            nodes.append(_nbits_node(node, packed_of[b], k, n, block_size))
            continue
        w = numpy_helper.to_array(weights[b])
        blocks = w.T.reshape(n, k // block_size, block_size)
        low, high = blocks.min(-1), blocks.max(-1)
        scale = (high - low) / 15.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        # A float zero point (the block's minimum over its scale), which the operator
        # accepts in place of a packed 4-bit one: a GGUF Q4_1 block (scale and minimum
        # per 32 weights) is then reproduced exactly, where an integer zero point would
        # round the minimum and add a second quantization error (+0.25 in loss).
        zero = (-low / scale).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[..., None] + zero[..., None]), 0, 15).astype(np.uint8)
        packed = q[..., 0::2] | (q[..., 1::2] << 4)
        tag = f"{b}_nbits{len(names)}"
        graph.graph.initializer.extend(
            [
                numpy_helper.from_array(packed.astype(np.uint8), f"{tag}_q4"),
                numpy_helper.from_array(scale.reshape(-1), f"{tag}_scales"),
                numpy_helper.from_array(zero.reshape(-1), f"{tag}_zeros"),
            ]
        )
        packed_of[b] = tag
        nodes.append(_nbits_node(node, tag, k, n, block_size))
        names.append(b)
    _drop_unused(graph, nodes)
    if names and not any(o.domain == "com.microsoft" for o in graph.opset_import):
        graph.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return names


def quantize_head_int8(graph: Any, vocab_chunks: int = 8) -> list[str]:
    """The LM head in int8, dequantized a vocabulary chunk at a time (in place).

    The head is the constant ``[K, N]`` B of the ``MatMul`` s whose logits feed a
    ``SoftmaxCrossEntropyLoss``. It is stored int8 with one scale per vocabulary word
    (symmetric, as :func:`quantize_frozen_weights`), cut into ``vocab_chunks`` column
    blocks; each such ``MatMul`` becomes, per block, ``DequantizeLinear`` + ``MatMul``,
    and a ``Concat`` of the blocks' logits. Only one block of the head is fp32 at a
    time (14 MB of SmolLM2's 113 MB), and no transposed copy of the head exists. A
    ``Transpose`` of a ``[N, K]`` initializer counts as the constant (the training
    export); the weight itself stays for its other readers (a tied embedding). 4 bits
    are too coarse here: SmolLM2's GGUF keeps its tied embedding in 8 bits (Q8_0), and a
    4-bit head cost +0.06 in loss where the
    4-bit decoder cost nothing (it reproduces the GGUF's Q4_1 blocks). ONNX Runtime
    1.19 has no 8-bit ``MatMulNBits``. Returns the heads' names.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    feeds_loss = {
        i for n in graph.graph.node if n.op_type == "SoftmaxCrossEntropyLoss" for i in n.input[:1]
    }
    feeds_loss |= {
        n.input[0] for n in graph.graph.node if n.op_type == "Cast" and n.output[0] in feeds_loss
    }
    inits = {
        t.name: t
        for t in graph.graph.initializer
        if t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and "lora_" not in t.name
    }
    # The training export's head is ``Transpose(W)`` of the ``[N, K]`` weight (the
    # tied embedding for SmolLM2), the inference export's a folded ``[K, N]`` constant.
    transposed = {
        n.output[0]: n.input[0]
        for n in graph.graph.node
        if n.op_type == "Transpose"
        and n.input[0] in inits
        and all(list(a.ints) == [1, 0] for a in n.attribute if a.name == "perm")
    }
    heads = {
        n.input[1]
        for n in graph.graph.node
        if n.op_type == "MatMul"
        and n.output[0] in feeds_loss
        and (n.input[1] in inits or n.input[1] in transposed)
    }
    chunks: dict[str, list[tuple[str, str, str]]] = {}
    for head in sorted(heads):
        if head in transposed:
            weight = numpy_helper.to_array(inits[transposed[head]]).T
        else:
            weight = numpy_helper.to_array(inits[head])
        q, scale = _int8_rows(weight.T)
        n = weight.shape[1]
        bounds = [n * c // vocab_chunks for c in range(vocab_chunks + 1)]
        chunks[head] = []
        for c, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
            tag = f"{head}_int8_{c}"
            graph.graph.initializer.extend(
                [
                    numpy_helper.from_array(np.ascontiguousarray(q[start:end].T), f"{tag}_q"),
                    numpy_helper.from_array(scale[start:end], f"{tag}_scale"),
                    numpy_helper.from_array(np.zeros(end - start, np.int8), f"{tag}_zero"),
                ]
            )
            chunks[head].append((f"{tag}_q", f"{tag}_scale", f"{tag}_zero"))
    nodes: list[Any] = []
    for node in graph.graph.node:
        parts = chunks.get(node.input[1]) if node.op_type == "MatMul" else None
        if parts is None:
            nodes.append(node)
            continue
        out, tag = node.output[0], node.name or node.output[0]
        for c, inputs in enumerate(parts):
            nodes += [
                helper.make_node(
                    "DequantizeLinear", list(inputs), [f"{out}_w{c}"], name=f"{tag}_dq{c}", axis=1
                ),
                helper.make_node(
                    "MatMul", [node.input[0], f"{out}_w{c}"], [f"{out}_{c}"], name=f"{tag}_{c}"
                ),
            ]
        concat = [f"{out}_{c}" for c in range(len(parts))]
        nodes.append(helper.make_node("Concat", concat, [out], name=f"{tag}_concat", axis=-1))
    _drop_unused(graph, nodes)
    return sorted(heads)


def _nbits_node(node: Any, tag: str, k: int, n: int, block_size: int) -> Any:
    from onnx import helper

    return helper.make_node(
        "MatMulNBits",
        [node.input[0], f"{tag}_q4", f"{tag}_scales", f"{tag}_zeros"],
        list(node.output),
        name=f"{node.name}_nbits",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block_size,
    )


def _drop_unused(graph: Any, nodes: list[Any]) -> None:
    """Set ``nodes`` as the graph's and drop the nodes and initializers nothing reads."""
    outputs = {o.name for o in graph.graph.output}
    while True:
        used = {name for node in nodes for name in node.input} | outputs
        alive = [n for n in nodes if any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    kept = [t for t in graph.graph.initializer if t.name in used]
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)


RANDOM_OPS = frozenset(
    {
        "Dropout",
        "BitmaskDropout",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)
"""Forward operators a recomputation would not reproduce."""
DATA_INPUTS = frozenset({"input_ids", "attention_mask", "labels"})
"""The training graph's inputs that are not parameters."""
LOGITS_OPS = ("Cast", "MatMul", "Concat", "ConcatTraining")
"""Between a loss slice and its hidden states: the head's ``MatMul`` (per vocabulary
block, ``Concat``ed, with an int8 head) and a ``Cast``; recomputed with the loss."""


def recompute_in_backward(graph: Any, layers: bool = True, weights: bool = True) -> int:
    """Let the backward pass recompute what the forward pass would otherwise keep.

    ``generate_artifacts`` wires every backward node to the forward tensors it needs,
    so those live from the forward pass to the backward one. What is recomputed
    instead:

    - a frozen weight dequantized from int8 (``DequantizeLinear``, perhaps
      ``Transpose``d: an fp32 copy of the weight, per layer); with ``weights`` false,
      only from initializers: a weight that is a graph input (every weight of the
      training model: the checkpoint feeds them) is then read from the forward's
      ``DequantizeLinear``, of which ONNX Runtime gives each reader its own copy
      (``*/duplicated`` in its profile), so it does not outlive its forward use either;
    - a loss slice's log-softmax (``SoftmaxCrossEntropyLoss`` over ``MatMul(hidden
      slice, head)``: the vocabulary's logits);
    - with ``layers``, every tensor computed inside a decoder layer (nodes named
      ``.../layers.<i>/...``) but the layer's outputs: the backward of layer ``i``
      re-runs the layer's forward from its input, so only the 30 layer inputs are kept
      from the forward pass instead of every activation (per-layer activation
      checkpointing; costs one more forward).

    Their backward consumers get a clone of the producing nodes (named ``*_recompute``),
    so the forward copies die right after their forward use. In the training model the
    weights are graph inputs (the checkpoint feeds them), so nothing but the session's
    own common-subexpression pass could merge a clone back into its forward twin: the
    device sessions run the training graph unoptimized (``SessionSettings``). Where a
    scale is an initializer, the clone reads a renamed copy of it. Returns the number
    of cloned nodes.
    """
    import re

    from onnx import numpy_helper

    nodes = list(graph.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    inits = {t.name: t for t in graph.graph.initializer}
    # Tensors computed from the weights alone. ``generate_artifacts`` makes every
    # parameter (the int8 weights and their scales too) a graph *input* fed from the
    # checkpoint: with ``weights`` those count, the data inputs never do.
    constant: set[str] = set(inits)
    if weights:
        constant |= {i.name for i in graph.graph.input if i.name not in DATA_INPUTS}

    backward_ids: set[int] = set()
    gradients: set[str] = set()
    for node in nodes:  # in topological order: a node reading a gradient is backward
        if (
            "_Grad/" in node.name
            or node.op_type.endswith("Grad")
            or node.name.startswith("AccumulateGrad")
            or any(i in gradients for i in node.input)
        ):
            backward_ids.add(id(node))
            gradients.update(node.output)

    def is_backward(node: Any) -> bool:
        return id(node) in backward_ids

    def layer_of(node: Any) -> str | None:
        found = re.search(r"layers\.(\d+)/", node.name)
        return found.group(1) if found and not is_backward(node) else None

    # A layer's outputs: tensors a forward node of another layer (or of none) reads.
    boundary = {
        i
        for node in nodes
        if not is_backward(node)
        for i in node.input
        if i in producer and layer_of(producer[i]) not in (None, layer_of(node))
    }
    boundary |= {o.name for o in graph.graph.output}

    for node in nodes:
        if not is_backward(node) and node.input and all(i in constant or not i for i in node.input):
            constant.update(node.output)

    def recomputable(node: Any) -> bool:
        if is_backward(node):
            return False
        if node.op_type == "DequantizeLinear":
            return node.output[0] in constant
        if node.op_type == "Transpose":  # of a dequantized weight
            source = producer.get(node.input[0])
            if source is not None and source.op_type == "DequantizeLinear":
                return True
        if node.op_type == "SoftmaxCrossEntropyLoss":
            return True
        return (
            layers
            and layer_of(node) is not None
            and node.op_type not in RANDOM_OPS
            and not any(o in boundary for o in node.output)
        )

    clones: dict[str, str] = {}
    added: dict[int, list[Any]] = {}

    def clone(name: str, position: int, through_loss: bool) -> str:
        node = producer.get(name)
        if node is None:
            return name
        ok = recomputable(node) or (through_loss and node.op_type in LOGITS_OPS)
        if not ok:
            return name
        if name in clones:
            return clones[name]
        copy = graph.graph.node.add()  # detached below; used as a builder
        copy.CopyFrom(node)
        graph.graph.node.pop()
        loss_path = node.op_type in ("SoftmaxCrossEntropyLoss", *LOGITS_OPS)
        inputs = []
        for i in node.input:
            if node.op_type == "DequantizeLinear" and i == node.input[1] and i in inits:
                fresh = f"{i}_recompute"
                if fresh not in inits:
                    inits[fresh] = numpy_helper.from_array(numpy_helper.to_array(inits[i]), fresh)
                    graph.graph.initializer.append(inits[fresh])
                inputs.append(fresh)
            else:
                inputs.append(clone(i, position, loss_path) if i else i)
        del copy.input[:]
        copy.input.extend(inputs)
        del copy.output[:]
        copy.output.extend(f"{o}_recompute" if o else o for o in node.output)
        copy.name = f"{node.name}_recompute"
        for old, new in zip(node.output, copy.output, strict=True):
            clones[old] = new
        added.setdefault(position, []).append(copy)
        return clones[name]

    for position, node in enumerate(nodes):
        if not is_backward(node):
            continue
        inputs = [clone(i, position, False) if i else i for i in node.input]
        if inputs != list(node.input):
            del node.input[:]
            node.input.extend(inputs)
    ordered: list[Any] = []
    for position, node in enumerate(nodes):
        ordered.extend(added.get(position, []))  # just before their first backward use
        ordered.append(node)
    del graph.graph.node[:]
    graph.graph.node.extend(ordered)
    return sum(len(v) for v in added.values())


def backward_after_loss(graph: Any) -> None:
    """Make the backward pass start after the forward loss (in place).

    The backward is seeded by the constant ``loss_grad``, so nothing in it waits for
    the forward's loss nodes, and ONNX Runtime's default order ran them last: every
    loss slice's forward logits then lived through the whole backward (all of them
    at once, the full vocabulary's logits). The seed is multiplied by
    ``Cast(Size(loss))`` (exactly 1, a scalar's size): a data dependency that costs
    nothing. Measured with memory reuse on; :func:`_export_training` gates only a graph
    whose head is in vocabulary blocks (with a whole head the gate raised the peak)."""
    from onnx import TensorProto, helper

    seed = "loss_grad"
    if not any(seed in n.input for n in graph.graph.node):
        return
    loss = graph.graph.output[0].name
    gated = f"{seed}_after_loss"
    for node in graph.graph.node:
        for k, name in enumerate(node.input):
            if name == seed:
                node.input[k] = gated
    graph.graph.node.extend(
        [
            helper.make_node("Size", [loss], [f"{gated}_size"], name=f"{gated}/Size"),
            helper.make_node(
                "Cast",
                [f"{gated}_size"],
                [f"{gated}_one"],
                name=f"{gated}/Cast",
                to=TensorProto.FLOAT,
            ),
            helper.make_node("Mul", [seed, f"{gated}_one"], [gated], name=f"{gated}/Mul"),
        ]
    )
