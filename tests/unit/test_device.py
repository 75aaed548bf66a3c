"""The reference device client: ONNX Runtime training agrees with torch, no torch import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fedtune.artifacts import build_artifacts
from fedtune.clients.device import (
    batch_order,
    perturbation,
    seed_pool,
    train_backprop,
    train_zeroth,
)
from fedtune.config import LoraConfig
from fedtune.data.population import chunk_tokens
from fedtune.data.sources import load_shakespeare
from fedtune.engines import seeds
from fedtune.engines.backprop import BackpropEngine
from fedtune.engines.base import EngineConfig
from fedtune.proto import device_pb2 as pb

from ..conftest import ROOT

LORA = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def artifacts():
    return build_artifacts("tiny-llama", 0, LORA)


@pytest.fixture(scope="module")
def setup(artifacts, tokenizer):
    """A tiny model with a non-zero B (so A gets gradients too), four chunks of text."""
    from fedtune.models import adapter_state, attach_lora, load_adapter_state, load_base_model

    model = attach_lora(load_base_model("tiny-llama"), LORA, seed=0)
    generator = torch.Generator().manual_seed(1)
    start = {
        k: v if "lora_A" in k else 0.1 * torch.randn(v.shape, generator=generator)
        for k, v in adapter_state(model).items()
    }
    load_adapter_state(model, start)
    text = "\n".join(c.text for c in load_shakespeare()[:3])
    chunks = chunk_tokens(tokenizer, text, 32)[:4]
    paths = {name: f.path for name, f in artifacts.files.items()}
    specs = [
        pb.TensorSpec(name=t.key, shape=list(t.shape), graph_name=t.graph_name)
        for t in artifacts.adapter
    ]
    return model, start, chunks, paths, specs


def flat(state, start):
    return np.concatenate([np.asarray(state[k] - start[k]).ravel() for k in sorted(start)])


def test_ort_training_artifacts_train_only_lora(artifacts):
    from fedtune.clients.device import onnxruntime

    trainable = {t.graph_name for t in artifacts.adapter}
    assert trainable and all("lora_" in name for name in trainable)
    capi = onnxruntime().capi._pybind_state
    state = capi.load_checkpoint(str(artifacts.file("checkpoint").path))
    names = state.parameter_names()
    assert {n for n in names if state.get_parameter(n).requires_grad} == trainable
    assert len(names) > len(trainable)  # the frozen base is in the checkpoint too


def test_the_trainable_buffer_is_in_the_order_of_the_task_adapter(artifacts):
    """Android sets and reads the adapter as one buffer (loadParametersBuffer /
    CopyBufferToParameters): its order must be the Task's adapter order."""
    from fedtune.clients.device import onnxruntime

    ort = onnxruntime()
    capi = ort.capi._pybind_state
    state = capi.load_checkpoint(str(artifacts.file("checkpoint").path))
    device = capi.OrtDevice(capi.OrtDevice.cpu(), capi.OrtDevice.default_memory(), 0)
    module = capi.Module(
        str(artifacts.file("training_model").path),
        state,
        str(artifacts.file("eval_model").path),
        device,
        capi.SessionOptions(),
    )
    size = module.get_parameters_size(True)
    buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(size, np.float32))
    module.copy_parameters_to_buffer(buffer._ortvalue, True)
    names = [t.graph_name for t in artifacts.adapter]  # the gateway's Task.adapter order
    expected = np.concatenate([state.get_parameter(n).data.numpy().ravel() for n in names])
    assert np.array_equal(buffer.numpy(), expected)


def test_ort_and_torch_updates_agree(setup):
    model, start, chunks, paths, specs = setup
    steps, batch, lr = 3, 4, 1e-2  # one batch holds every chunk: same data whatever the order
    torch_update = BackpropEngine().train(
        model, chunks, EngineConfig(lr=lr, local_steps=steps, batch_size=batch, seed=0)
    )
    ort = train_backprop(
        paths,
        {k: v.numpy() for k, v in start.items()},
        specs,
        chunks.numpy(),
        pb.TrainConfig(lr=lr, local_steps=steps, batch_size=batch, seed=0),
    )
    assert ort.losses[0] == pytest.approx(torch_update.metrics["loss-first"], abs=1e-5)
    a = flat(
        {k: v.numpy() for k, v in torch_update.state.items()},
        {k: v.numpy() for k, v in start.items()},
    )
    b = flat(ort.arrays, {k: v.numpy() for k, v in start.items()})
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cosine > 0.99, cosine
    assert ort.num_examples == steps * batch


def test_zeroth_on_the_inference_graph_matches_the_torch_loss(setup):
    model, start, chunks, paths, specs = setup
    numpy_start = {k: v.numpy() for k, v in start.items()}
    config = pb.TrainConfig(
        engine="zeroth", lr=1e-3, local_steps=2, batch_size=4, seed=0, eps=1e-2, num_seeds=8
    )
    result = train_zeroth(paths, numpy_start, specs, chunks.numpy(), config)
    from fedtune.models import load_adapter_state

    load_adapter_state(model, start)  # another test may have trained the model
    with torch.no_grad():
        loss = float(model(input_ids=chunks, labels=chunks).loss)
    # The first step's loss is the mean of the two perturbed losses: close to the loss.
    assert result.losses[0] == pytest.approx(loss, abs=1e-2)
    assert any(not np.array_equal(result.arrays[k], numpy_start[k]) for k in numpy_start)


def test_device_perturbations_and_seed_pool_equal_the_engines():
    specs = [("a", (3, 5)), ("b", (70,))]
    assert seed_pool(7, 16) == seeds.seed_pool(7, 16)
    for seed in seeds.seed_pool(3, 4):
        ours, theirs = perturbation(seed, specs), seeds.perturbation(seed, specs)
        for name, _ in specs:
            assert np.array_equal(ours[name], theirs[name].numpy())


def test_batch_order_covers_every_chunk_each_epoch():
    order = np.concatenate(batch_order(5, 2, 5, seed=3))
    assert sorted(order.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_the_device_client_imports_neither_torch_nor_flwr():
    code = (
        "import sys\n"
        "import fedtune.clients.device as d\n"
        "d.onnxruntime(); import tokenizers\n"
        "top = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(top & {'torch', 'flwr', 'transformers'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
