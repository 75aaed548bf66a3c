"""Forward-gradient LoRA: gradients from directional derivatives only, no backward pass.

FwdLLM (Xu et al., "FwdLLM: Efficient Federated Finetuning of Large Language Models
with Perturbed Inferences", USENIX ATC 2024). Each step draws random directions
``v_1..v_n`` over the trained LoRA weights (±1 entries, seeded; see
:mod:`fedtune.engines.seeds`), takes the directional derivatives ``d_i = grad L . v_i``
on the step's batch, and estimates the gradient as ``g = mean_i d_i v_i`` (unbiased,
since ``E[v vᵀ] = I``). An optimizer then applies ``g`` as if it were the gradient.

Estimator. ``d_i`` comes from ``torch.func.jvp`` over ``torch.func.functional_call``:
forward-mode AD, exact up to rounding. It is the default because then all the
estimator's variance comes from the random directions, which the variance control
measures; a finite difference adds a bias and, in bf16, rounding noise on top.
``forward_derivative = "fd"`` takes the two-point difference
``(L(w + eps v) - L(w - eps v)) / (2 eps)`` instead (as FwdLLM's own code does): two
plain forward passes, cheaper than a jvp on CPU and possible on every quantized layer.
Forward-mode AD fails on bitsandbytes and HQQ layers, and bnb nf4 even yields a zero
tangent silently: :func:`check_forward_ad` refuses such a model with a
:class:`ConfigError` rather than train on a zero gradient.

Variance control (FwdLLM's variance-controlled pacing, applied per local step): after
``perturbations`` directions, more are drawn one at a time while the estimated
variance of ``g`` (the sample variance of the ``d_i v_i`` over ``n``, averaged over
the adapter's values) exceeds ``variance_threshold``, up to ``max_perturbations``.

Optimizer: ``sgd`` (default) follows the estimate; its expected step is the true
gradient step, and the direction noise averages out over steps. ``adamw`` rescales each
value by its running RMS, which for these estimates is mostly noise, so every value
moves by about ``lr`` whatever its signal; on SmolLM2-135M it lowered the held-out loss
less than SGD did (``benchmarks/engines_smoke.py``). Dropout is off (eval mode), so a step's
directions all see the same function. With FedProx's ``proximal_mu`` the exact
gradient of the proximal term, ``mu (w - w_global)``, is added to the estimate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedtune.data.instruct import Tokens, batch_parts
from fedtune.engines.base import (
    ForwardSettings,
    ProbeSettings,
    Update,
    first_and_last,
    sample_batches,
)
from fedtune.engines.seeds import combine, perturbation, pick_directions, seed_pool
from fedtune.errors import ConfigError
from fedtune.models.lora import adapter_state, is_adapter, state_name, trained

Tensors = dict[str, torch.Tensor]


class ForwardEngine:
    """FwdLLM-style forward-gradient training of the LoRA weights."""

    name = "forward"

    def train(self, model: Any, chunks: Tokens, config: ForwardSettings) -> Update:
        lora = [p for n, p in model.named_parameters() if is_adapter(n)]
        params = {
            n: p for n, p in sorted(model.named_parameters()) if trained(n, config.train_only)
        }
        if not params:
            raise ConfigError(f"no LoRA weight of the model matches lora-train={config.train_only}")
        for p in lora:
            p.requires_grad_(False)  # no autograd graph: forward-mode AD needs none
        if config.forward_derivative == "jvp":
            check_forward_ad(model)
        optimizer = (torch.optim.SGD if config.forward_optimizer == "sgd" else torch.optim.AdamW)(
            params.values(), lr=config.lr, weight_decay=config.weight_decay
        )
        anchors = {n: p.detach().clone() for n, p in params.items()} if config.proximal_mu else {}
        directions = np.random.default_rng(config.seed)
        batches = sample_batches(len(chunks), config.batch_size, config.local_steps, config.seed)
        losses: list[float] = []
        counts: list[int] = []
        variances: list[float] = []
        model.eval()
        for index in batches:
            point = {n: p.detach() for n, p in params.items()}
            loss, estimate, slopes, variance = estimate_gradient(
                model, point, chunks[index], directions, config
            )
            if config.forward_derivative == "jvp" and config.train_only != "A" and not any(slopes):
                # With B in the tangent a slope is never exactly 0, unless the tangent was
                # dropped on the way (a layer without forward-mode AD that check missed).
                raise ConfigError(
                    "engine 'forward' got a zero directional derivative for every direction: "
                    "forward-mode AD does not pass through some layer of this model; use "
                    "client.engine = 'zeroth' or 'backprop', or forward-derivative = 'fd'"
                )
            for name, p in params.items():
                if anchors:
                    estimate[name] += config.proximal_mu * (p.detach() - anchors[name]).float()
                p.grad = estimate[name].to(p.dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            counts.append(len(slopes))
            variances.append(variance)
        passes = sum(counts) * (1 if config.forward_derivative == "jvp" else 2)
        metrics = {
            **first_and_last(losses),
            "perturbations-per-step": sum(counts) / len(counts),
            "forward-passes": float(passes),
        }
        if all(math.isfinite(v) for v in variances):  # one direction a step has none
            metrics["variance-mean"] = sum(variances) / len(variances)
        return Update(
            state=adapter_state(model),
            num_examples=config.local_steps * config.batch_size,
            loss=sum(losses) / len(losses),
            metrics=metrics,
        )

    def probe(self, model: Any, chunks: Tokens, config: ProbeSettings) -> Update:
        """FwdLLM's client work: the directional derivative of the loss along
        ``config.probes`` directions of the seed pool, at the adapter as loaded, one
        batch each; no step is taken. :attr:`Update.seed_steps` holds ``(pool index,
        derivative)`` per direction (the server pools them); :attr:`Update.state` is the
        adapter unchanged."""
        params = {
            n: p for n, p in sorted(model.named_parameters()) if trained(n, config.train_only)
        }
        if not params:
            raise ConfigError(f"no LoRA weight of the model matches lora-train={config.train_only}")
        for p in model.parameters():
            p.requires_grad_(False)
        if config.forward_derivative == "jvp":
            check_forward_ad(model)
        names = {n: state_name(model, n) for n in params}
        specs = sorted((names[n], tuple(p.shape)) for n, p in params.items())
        pool = seed_pool(config.run_seed, config.num_seeds)
        guide = combine(config.guide, pool, specs) if config.guide and config.guide_sigmas else None
        rng = np.random.default_rng(config.seed)
        indices, drawn = pick_directions(
            rng, config.probes, pool, specs, guide, config.guide_sigmas, config.guide_tries
        )
        batches = sample_batches(len(chunks), config.batch_size, max(len(indices), 1), config.seed)
        point = {n: p.detach() for n, p in params.items()}
        steps: list[tuple[int, float]] = []
        losses: list[float] = []
        model.eval()
        for index, batch in zip(indices, batches, strict=False):
            z = perturbation(pool[index], specs)
            tangent = {n: z[names[n]].to(p.dtype) for n, p in point.items()}
            loss, slope = directional_derivative(
                model, point, tangent, chunks[batch], config.forward_derivative, config.eps
            )
            steps.append((index, float(np.float32(slope))))
            losses.append(loss)
        if not steps:
            raise ConfigError(
                f"no direction passed discriminative sampling in {config.guide_tries} tries "
                f"each (guide-sigmas = {config.guide_sigmas}): lower the strategy's guide_sigmas"
            )
        passes = len(steps) * (1 if config.forward_derivative == "jvp" else 2)
        return Update(
            state=adapter_state(model),
            num_examples=len(steps) * config.batch_size,
            loss=sum(losses) / len(losses),
            metrics={
                **first_and_last(losses),
                "forward-passes": float(passes),
                "probes": float(len(steps)),
                "candidates": float(drawn),
            },
            seed_steps=steps,
        )


def estimate_gradient(
    model: Any,
    point: Tensors,
    input_ids: Tokens,
    directions: np.random.Generator,
    config: ForwardSettings,
) -> tuple[float, Tensors, list[float], float]:
    """One step's estimate ``mean_i d_i v_i`` at ``point`` (fp32), drawing directions
    until the variance check passes. Returns the loss, the estimate, the slopes ``d_i``
    and the estimate's variance per value (inf from a single direction)."""
    specs = [(n, tuple(p.shape)) for n, p in point.items()]
    size = sum(p.numel() for p in point.values())
    total = {n: torch.zeros(p.shape) for n, p in point.items()}
    squares = 0.0  # sum of ||d_i v_i||^2 = d_i^2 * size, as v is ±1
    slopes: list[float] = []
    while True:
        v = perturbation(int(directions.integers(2**32)), specs)
        tangent = {n: v[n].to(p.dtype) for n, p in point.items()}
        loss, slope = directional_derivative(
            model, point, tangent, input_ids, config.forward_derivative, config.eps
        )
        for n, t in total.items():
            t.add_(v[n], alpha=slope)
        squares += slope * slope * size
        slopes.append(slope)
        count = len(slopes)
        variance = math.inf
        if count > 1:
            spread = squares - sum(float(t.pow(2).sum()) for t in total.values()) / count
            variance = spread / ((count - 1) * count * size)
        if count >= config.max_perturbations or (
            count >= config.perturbations and variance <= config.variance_threshold
        ):
            return loss, {n: t / count for n, t in total.items()}, slopes, variance


def directional_derivative(
    model: Any,
    params: Tensors,
    direction: Tensors,
    input_ids: Tokens,
    derivative: str = "jvp",
    eps: float = 1e-2,
) -> tuple[float, float]:
    """The LM loss on ``input_ids`` (a batch of chunks, or labelled rows) at ``params``
    (a subset of the model's parameters, by name) and its slope along ``direction``: by
    forward-mode AD (``jvp``) or by a two-point finite difference (``fd``, then the loss
    is the mean of the two points)."""

    def loss_of(weights: Tensors) -> torch.Tensor:
        ids, mask, labels = batch_parts(input_ids)
        kwargs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return torch.func.functional_call(model, weights, args=(), kwargs=kwargs).loss

    if derivative == "fd":
        with torch.no_grad():
            plus = float(loss_of({n: p + eps * direction[n] for n, p in params.items()}))
            minus = float(loss_of({n: p - eps * direction[n] for n, p in params.items()}))
        return (plus + minus) / 2, (plus - minus) / (2 * eps)
    try:
        loss, slope = torch.func.jvp(loss_of, (params,), (direction,))
    except (RuntimeError, NotImplementedError) as exc:
        raise ConfigError(
            f"engine 'forward' cannot take a forward-mode derivative of this model ({exc}); "
            "use client.engine = 'zeroth' or 'backprop', or forward-derivative = 'fd'"
        ) from exc
    return float(loss), float(slope)


def check_forward_ad(model: Any) -> None:
    """Raise :class:`ConfigError` unless forward-mode AD passes through every kind of
    linear layer in ``model``: bitsandbytes and HQQ layers raise, and bnb nf4 gives a
    zero tangent without a word, which would train on a zero gradient."""
    activations = model.get_input_embeddings().weight.dtype
    generator = torch.Generator().manual_seed(0)
    seen: set[tuple[type, type]] = set()
    for name, module in model.named_modules():
        features = getattr(module, "in_features", None)
        weight = getattr(module, "weight", None)
        kind = (type(module), type(weight))
        if not isinstance(features, int) or next(module.children(), None) is not None:
            continue
        if kind in seen:
            continue
        seen.add(kind)
        # LoRA factors stay fp32 on a bf16 base; packed quantized weights take activations.
        floating = isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point
        dtype = weight.dtype if floating and weight is not None else activations
        x = torch.randn(1, features, generator=generator).to(dtype)
        t = torch.randn(1, features, generator=generator).to(dtype)
        layer = f"{type(module).__module__}.{type(module).__qualname__}"
        try:
            _, tangent = torch.func.jvp(module, (x,), (t,))
        except (RuntimeError, NotImplementedError) as exc:
            problem = f"fails ({str(exc).splitlines()[0].rstrip('.')})"
        else:
            ok = bool(torch.isfinite(tangent).all()) and bool(tangent.abs().sum() > 0)
            problem = "" if ok else "gives a zero or non-finite tangent"
        if problem:
            raise ConfigError(
                f"engine 'forward' does not work with {layer} layers (e.g. {name}): "
                f"forward-mode AD through them {problem}. Use client.engine = 'zeroth' or "
                "'backprop', forward-derivative = 'fd', or model.quantization = 'int8' (torchao)"
            )
