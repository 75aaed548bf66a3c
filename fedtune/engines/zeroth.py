"""Zeroth-order LoRA with seed-only updates: MeZO steps over a pool of K seeds (FedKSeed).

MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS
2023) estimates the slope along a random direction ``z`` from two forward passes on the
same batch, ``g = (L(w + eps z) - L(w - eps z)) / (2 eps)``, and steps
``w <- w - lr g z``. FedKSeed (Qin et al., ICML 2024) draws ``z`` from one of K seeds
fixed for the run, so a local step is just ``(seed index, g)``: the update carries that
list (:attr:`Update.seed_steps`, 8 bytes a step), and whoever holds the starting adapter
rebuilds the final one with :func:`fedtune.engines.seeds.replay`, bit for bit.

The weights the model sees are written from an fp32 master copy (``w + eps z``,
``w - eps z``, then ``w``) rather than perturbed and restored in place, so no rounding
drift builds up and the master follows the replay rule exactly, in bf16 compute too.
Dropout is off (eval mode): both passes must see the same function. With FedProx's
``proximal_mu``, ``g`` gains ``mu <w - w_global, z>``, the exact central difference of
the proximal term. Weight decay is refused: it would not replay from seeds alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedtune.data.instruct import Tokens, batch_parts
from fedtune.engines.base import Update, ZerothSettings, first_and_last, sample_batches
from fedtune.engines.loss import causal_lm_loss
from fedtune.engines.seeds import (
    SeedStep,
    apply_step,
    perturbation,
    seed_pool,
    trained_keys,
)
from fedtune.errors import ConfigError
from fedtune.models.lora import AdapterState, adapter_state, is_adapter, state_name


class ZerothEngine:
    """MeZO/FedKSeed two-point zeroth-order training of the LoRA weights."""

    name = "zeroth"

    def train(self, model: Any, chunks: Tokens, config: ZerothSettings) -> Update:
        if config.weight_decay > 0:
            raise ConfigError(
                "engine 'zeroth' applies no weight decay (its update must replay from the "
                f"seeds alone): set client.weight_decay = 0, not {config.weight_decay}"
            )
        params = lora_parameters(model)
        master = adapter_state(model)
        keys = trained_keys(master, config.train_only)
        if not keys:
            raise ConfigError(f"no LoRA weight of the model matches lora-train={config.train_only}")
        anchor = {k: master[k].clone() for k in keys} if config.proximal_mu > 0 else {}
        specs = [(k, tuple(master[k].shape)) for k in keys]
        pool = seed_pool(config.run_seed, config.num_seeds)
        rng = np.random.default_rng(config.seed)
        if config.seed_probabilities:  # FedKSeed-Pro: important seeds more often
            weights = np.asarray(config.seed_probabilities, dtype=np.float64)
            picks = rng.choice(config.num_seeds, size=config.local_steps, p=weights / weights.sum())
        else:
            picks = rng.integers(config.num_seeds, size=config.local_steps)
        batches = sample_batches(len(chunks), config.batch_size, config.local_steps, config.seed)
        steps: list[SeedStep] = []
        losses: list[float] = []
        model.eval()
        with torch.no_grad():
            try:
                for index, pick in zip(batches, picks.tolist(), strict=True):
                    batch = chunks[index]
                    z = perturbation(pool[pick], specs)
                    plus = _loss_at(model, params, master, z, config.eps, batch)
                    minus = _loss_at(model, params, master, z, -config.eps, batch)
                    slope = (plus - minus) / (2 * config.eps)
                    if anchor:
                        slope += config.proximal_mu * sum(
                            float(((master[k] - anchor[k]) * z[k]).sum()) for k in keys
                        )
                    scalar = float(np.float32(slope))  # as it travels: replay sees this
                    apply_step(master, keys, pool[pick], scalar, config.lr)
                    steps.append((pick, scalar))
                    losses.append((plus + minus) / 2)
            finally:  # never leave the model on a perturbed point
                for key in keys:
                    params[key].copy_(master[key])
        return Update(
            state=master,
            num_examples=config.local_steps * config.batch_size,
            loss=sum(losses) / len(losses),
            metrics=first_and_last(losses),
            seed_steps=steps,
        )


def lora_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """The model's LoRA parameters under their adapter-state names (no adapter name)."""
    return {state_name(model, n): p for n, p in model.named_parameters() if is_adapter(n)}


def _loss_at(
    model: Any,
    params: dict[str, torch.nn.Parameter],
    master: AdapterState,
    z: dict[str, torch.Tensor],
    eps: float,
    batch: Tokens,
) -> float:
    """The loss with the trained weights set to ``master + eps * z``."""
    for key, direction in z.items():
        params[key].copy_(master[key] + eps * direction)
    return float(causal_lm_loss(model, *batch_parts(batch)))
