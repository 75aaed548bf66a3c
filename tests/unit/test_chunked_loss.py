"""The chunked causal-LM loss: equal to the model's own, and never all logits at once."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fedtune.config import LoraConfig
from fedtune.engines.loss import LOSS_CHUNKS, causal_lm_loss
from fedtune.models import attach_lora, load_base_model
from fedtune.ondevice.artifacts import build_artifacts

LORA = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def model():
    return attach_lora(load_base_model("tiny-llama", "fp32", 0, "none"), LORA, seed=0)


def batch(vocab: int, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


def test_the_chunked_loss_equals_the_models_own(model):
    ids = batch(model.config.vocab_size)
    labels = ids.clone()
    labels[0, :5] = -100  # ignored positions count as in transformers' loss
    mask = torch.ones_like(ids)
    own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    for recompute in (True, False):
        chunked = causal_lm_loss(model, ids, mask, labels, recompute=recompute)
        assert chunked.item() == pytest.approx(own.item(), abs=1e-5)


def largest_saved_with_vocab(model, loss_fn) -> int:
    """Elements of the largest tensor autograd keeps for backward whose last dimension
    is the vocabulary (the logits, their log-softmax)."""
    vocab = model.config.vocab_size
    sizes = [0]

    def pack(t):
        if t.dim() >= 1 and t.shape[-1] == vocab and t.numel() > vocab:  # not the head
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn().backward()
    return max(sizes)


def test_a_training_step_keeps_no_full_logits_tensor(model):
    ids = batch(model.config.vocab_size, (4, 64))
    mask = torch.ones_like(ids)
    vocab = model.config.vocab_size
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    full = largest_saved_with_vocab(
        model, lambda: model(input_ids=ids, attention_mask=mask, labels=ids).loss
    )
    chunked = largest_saved_with_vocab(model, lambda: causal_lm_loss(model, ids, mask, ids))
    assert full >= tokens * vocab  # the model's own loss keeps every token's logits
    # Chunked with recomputation keeps none: slices are recomputed in the backward,
    # and at most one slice's logits exist at a time.
    assert chunked == 0


def test_the_training_graph_recomputes_logits_and_layers_for_backward():
    """ORT training artifacts: the backward reads recomputed log-probs (one slice at a
    time) and recomputed layer activations instead of keeping the forward's, and each
    frozen weight is dequantized once (ORT gives each reader its own copy of the node)."""
    artifacts = build_artifacts("tiny-llama", 0, LORA, int8="weights")
    graph = onnx.load(str(artifacts.file("training_model").path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    losses = [n for n in graph.node if n.op_type == "SoftmaxCrossEntropyLoss"]
    forward = [n for n in losses if not n.name.endswith("_recompute")]
    assert len(forward) == LOSS_CHUNKS
    grads = [n for n in graph.node if n.op_type == "SoftmaxCrossEntropyLossGrad"]
    assert len(grads) == LOSS_CHUNKS
    for grad in grads:
        assert producer[grad.input[1]].name.endswith("_recompute"), grad.name
    backward = [n for n in graph.node if "_Grad/" in n.name]
    # One dequantization per int8 weight, the head's whole (its fp32 copy is below
    # TRAINING_HEAD_BLOCKS_MB): the backward re-runs none, so no second fp32 head.
    int8_read = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"]
    assert int8_read and len(int8_read) == len(set(int8_read))
    assert not [n for n in int8_read if "_int8_" in n]  # no vocabulary blocks
    assert not [n for n in graph.node if n.name.startswith("loss_grad_after_loss")]
    # The embedding is read as int8 rows: no Gather reads a dequantized table.
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert not [n for n in graph.node if n.op_type == "Gather" and n.input[0] in dequantized]
    # Per-layer recomputation: of what a layer computes, the backward keeps only the
    # layer's outputs (what the next layer reads); everything else it re-runs.
    layer = re.compile(r"layers\.(\d+)/")
    backward += [n for n in graph.node if n.name.startswith("AccumulateGrad")]
    forward = [n for n in graph.node if n not in backward]

    def layer_of(node: onnx.NodeProto) -> str | None:
        found = layer.search(node.name)
        return found[1] if found else None

    reads_across = {  # a layer's outputs: read by a forward node of another layer, or none
        i
        for n in forward
        for i in n.input
        if i in producer and layer_of(producer[i]) not in (None, layer_of(n))
    }
    kept = {
        i
        for n in backward
        for i in n.input
        if i in producer
        and layer_of(producer[i]) is not None
        and producer[i] in forward
        and not producer[i].name.endswith("_recompute")
    }
    assert kept and kept <= reads_across, sorted(kept - reads_across)[:3]


def test_a_head_above_the_threshold_is_kept_in_vocabulary_blocks(tmp_path, monkeypatch):
    """The training graph's head is blocked by its fp32 size: with the threshold below
    the tiny model's head, its int8 training graph has the blocks, its backward
    re-dequantizes the weights and starts after the forward loss (format 5's graph)."""
    from fedtune.ondevice import artifacts as module

    monkeypatch.setattr(module, "TRAINING_HEAD_BLOCKS_MB", 0.0)
    built = build_artifacts("tiny-llama", 0, LORA, cache=tmp_path, int8="weights")
    graph = onnx.load(str(built.file("training_model").path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    blocks = [n for n in graph.node if n.op_type == "DequantizeLinear" and "_int8_" in n.input[0]]
    assert len(blocks) >= 8
    backward = [n for n in graph.node if "_Grad/" in n.name]
    # Neither the backward nor its recomputation reads a weight the forward dequantized.
    for node in backward + [n for n in graph.node if n.name.endswith("_recompute")]:
        for name in node.input:
            source = producer.get(name)
            if source is not None and source.op_type == "DequantizeLinear":
                assert source.name.endswith("_recompute"), (node.name, name)
    # The gradient the backward starts from depends on the loss output.
    seeded = [n for n in backward if n.name.startswith("/Div") and "_Grad/" in n.name]
    ancestors, todo = set(), [i for n in seeded for i in n.input]
    while todo:
        name = todo.pop()
        if name not in ancestors:
            ancestors.add(name)
            todo += list(producer[name].input) if name in producer else []
    assert seeded and graph.output[0].name in ancestors


def test_the_int4_inference_graph_keeps_weights_4bit_and_the_loss():
    from fedtune.ondevice.engines import onnxruntime

    fp32 = build_artifacts("tiny-llama", 0, LORA)
    int4 = build_artifacts("tiny-llama", 0, LORA, int8="int4")
    graph = onnx.load(str(int4.file("inference_model").path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 2 * 7  # 7 projections per layer
    # The head is int8, dequantized one vocabulary block at a time: nothing expands a
    # whole table to fp32.
    inits = {t.name: tuple(t.dims) for t in graph.initializer}
    blocks = [inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(blocks) >= 8 and all(k == 64 for k, _ in blocks)  # [hidden, words of a block]
    assert max(n for _, n in blocks) <= -(-49152 // 8)
    # The tiny model is mostly vocabulary (embedding and head), both kept int8.
    assert int4.file("inference_model").size < 0.3 * fp32.file("inference_model").size
    ort = onnxruntime()
    ids = batch(2000, (2, 24)).numpy()
    losses = []
    for artifacts in (fp32, int4):
        session = ort.InferenceSession(
            str(artifacts.file("inference_model").path), providers=["CPUExecutionProvider"]
        )
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
        feed.update({t.graph_name: np.zeros(t.shape, np.float32) for t in artifacts.adapter})
        losses.append(float(session.run(["loss"], feed)[0]))
    assert losses[1] == pytest.approx(losses[0], abs=0.05)


def live_tensors_at_peak(profile: Path, graph: onnx.GraphProto) -> tuple[int, dict[str, int]]:
    """Bytes of node outputs alive at the step's peak, from ONNX Runtime's profile (each
    executed node's output shapes, in the executed order): a tensor lives from its node
    until its last reader (graph outputs: to the end). Returns the peak and its tensors."""
    import json
    import math

    itemsize = {"float": 4, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}
    nodes = {n.name: n for n in graph.node}
    events = sorted(
        (e for e in json.loads(profile.read_text()) if e.get("cat") == "Node"),
        key=lambda e: e["ts"],
    )
    executed = []
    for event in events:
        node = nodes.get(event["name"].removesuffix("_kernel_time"))
        if node is not None and event["name"].endswith("_kernel_time"):
            shapes = event["args"]["output_type_shape"]
            sizes = [
                math.prod(next(iter(s.values()))) * itemsize.get(next(iter(s)), 4) for s in shapes
            ]
            executed.append((node, sizes))
    last: dict[str, int] = {}
    for t, (node, _) in enumerate(executed):
        for name in node.input:
            last[name] = t
    outputs = {o.name for o in graph.output}
    alive: dict[str, int] = {}
    peak, at_peak = 0, {}
    for t, (node, sizes) in enumerate(executed):
        alive.update((o, s) for o, s in zip(node.output, sizes, strict=False) if o)
        if sum(alive.values()) > peak:
            peak, at_peak = sum(alive.values()), dict(alive)
        for name in (*node.input, *node.output):
            if name not in outputs and last.get(name, t) <= t:
                alive.pop(name, None)
    return peak, at_peak


def test_a_training_steps_tensors_never_hold_the_vocabularys_logits(tmp_path):
    """The int8 training graph with the head in vocabulary blocks (a head above
    TRAINING_HEAD_BLOCKS_MB: Gemma-3-270M's) on the tiny model, one step with ONNX
    Runtime's profile: at the step's peak the live tensors are fewer bytes than the full
    logits, and of what has the vocabulary's size only one token slice's (logits, their
    log-softmax, its gradient) and one block of the head are there - the full logits and
    the fp32 head never exist, and the forward's dequantized weights are not kept."""
    from fedtune.ondevice.engines import PHONE, onnxruntime

    artifacts = build_artifacts("tiny-llama", 0, LORA, int8="int4", head_blocks=True)
    graph = onnx.load(str(artifacts.file("training_model").path)).graph
    capi = onnxruntime().capi._pybind_state
    state = capi.load_checkpoint(str(artifacts.file("checkpoint").path))
    options = PHONE.apply(capi.SessionOptions(), training=True)
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "step")
    device = capi.OrtDevice(capi.OrtDevice.cpu(), capi.OrtDevice.default_memory(), 0)
    paths = [str(artifacts.file(name).path) for name in ("training_model", "eval_model")]
    module = capi.Module(paths[0], state, paths[1], device, options)
    ids = batch(2000, (4, 64)).numpy()
    module.train_step([ids, np.ones_like(ids), ids], capi.OrtValueVector())
    del module  # writes the profile
    (profile,) = [p for p in tmp_path.glob("step*.json") if p.stat().st_size > 10_000]
    peak, at_peak = live_tensors_at_peak(profile, graph)

    blocks = [n for n in graph.node if n.op_type == "DequantizeLinear" and "_int8_" in n.input[0]]
    assert blocks  # the head is dequantized in vocabulary blocks
    embedding = next(t for t in graph.input if t.name.endswith("embed_tokens.weight_int8"))
    vocab, hidden = (d.dim_value for d in embedding.type.tensor_type.shape.dim)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    logits = tokens * vocab * 4
    assert peak < logits, (peak, logits, sorted(at_peak.items(), key=lambda x: -x[1])[:8])
    # Everything alive at the peak that is as large as a tenth of the logits: at most
    # three slices' worth (logits, log-softmax, gradient) and the fp32 head's block.
    large = {n: s for n, s in at_peak.items() if s >= logits // 10}
    assert sum(large.values()) <= 3 * logits // LOSS_CHUNKS + 2 * hidden * vocab * 4 // 8, large
    # No full-precision weight of the decoder outlives its use.
    assert not [n for n in at_peak if n.endswith(".weight") and "lora_" not in n]
