"""The chunked causal-LM loss: equal to the model's own, and never all logits at once."""

from __future__ import annotations

import re

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


def test_the_training_graph_recomputes_logits_and_weights_for_backward():
    """ORT training artifacts: the backward reads recomputed log-probs (one slice at a
    time) and re-dequantizes int8 weights, instead of keeping the forward's copies."""
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
    for node in backward:
        for name in node.input:
            source = producer.get(name)
            if source is not None and source.op_type == "DequantizeLinear":
                assert source.name.endswith("_recompute"), (node.name, name)
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
