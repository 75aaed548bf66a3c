"""Every rule that spans sections of a scenario, as pure checks.

Each function raises :class:`~fedtune.errors.ConfigError` naming the key to change, or
returns. :func:`check_scenario` runs when a scenario loads (it needs the scenario
alone); :func:`check_federation` needs what the scenario builds — the strategy's
declared traits, the population, the device tiers' LoRA ranks — and runs in preflight,
before Ray, a SuperLink or a gateway starts. The round loop runs it again on start, so
``flwr run .`` (which skips fedtune's preflight) is refused just as early.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedtune.errors import ConfigError
from fedtune.protocol import StrategyTraits

if TYPE_CHECKING:
    from fedtune.config import Scenario

SEED_ENGINES = ("zeroth",)
"""Engines whose clients upload seed steps, which the server replays on the adapter sent."""
PHONE_ENGINES = ("backprop", "zeroth", "forward")
"""Engines the device gateway serves to phones (``forward`` only as FwdLLM's probes)."""
INFERENCE_PHONE_ENGINES = ("zeroth", "forward")
"""Engines phones run on the inference graph alone (no ORT training artifacts)."""


def may_upload_seeds(engine: str) -> bool:
    """Whether clients under ``client.engine = engine`` may upload seed steps."""
    return engine in SEED_ENGINES or engine == "auto"


def check_scenario(scenario: Scenario) -> None:
    """Rules between sections that the scenario alone decides."""
    from fedtune.tasks import check_task

    check_task(scenario)  # model.task against data, quantization, phones, metrics
    client, model, privacy, gateway = (
        scenario.client,
        scenario.model,
        scenario.privacy,
        scenario.gateway,
    )
    if (
        client.engine == "forward"
        and client.forward_derivative == "jvp"
        and model.quantization in ("nf4", "int4")
    ):
        raise ConfigError(
            f"'client.forward_derivative' 'jvp' needs forward-mode AD, which "
            f"{model.quantization} layers (bitsandbytes, HQQ) do not support: set it to "
            "'fd' (finite differences) or use model.quantization = 'int8' or 'none'"
        )
    if may_upload_seeds(client.engine) and privacy.secure_aggregation:
        raise ConfigError(
            f"'privacy.secure_aggregation' masks adapter updates; client.engine = "
            f"{client.engine!r} uploads seed steps: use central or local DP without secure "
            "aggregation"
        )
    if (
        gateway.enabled
        and gateway.artifact_int8 == "dynamic"
        and client.engine not in INFERENCE_PHONE_ENGINES
    ):
        raise ConfigError(
            f"'gateway.artifact_int8' = 'dynamic' with client.engine = {client.engine!r}: ONNX "
            "Runtime training has no gradient for DynamicQuantizeLinear/MatMulInteger, so "
            "phones could not train by backprop; use 'weights' (int8 storage, fp32 "
            "arithmetic) or client.engine = 'zeroth' (or 'forward' under strategy fwdllm)"
        )


def check_federation(
    scenario: Scenario,
    traits: StrategyTraits,
    population: int,
    mixed_ranks: Mapping[str, int],
) -> None:
    """Rules between the scenario and what it builds.

    Parameters
    ----------
    scenario
        The resolved scenario.
    traits
        What the strategy declares (:func:`fedtune.protocol.traits_of`).
    population
        Training clients.
    mixed_ranks
        Device tiers whose LoRA rank differs from ``lora.r`` (tier -> rank); empty
        without ``[devices]`` or with ``devices.tier_ranks = false``.
    """
    name, engine = scenario.strategy.name, scenario.client.engine
    if scenario.round.sampled > population:
        raise ConfigError(
            f"round.clients_per_round = {scenario.round.clients_per_round} (with over-selection "
            f"{scenario.round.sampled}) exceeds the {population} training clients: lower it or "
            "raise data.num_clients"
        )
    if engine == "auto" and not scenario.devices.enabled:
        raise ConfigError(
            "client.engine = 'auto' picks an engine per device tier: set [devices] "
            "enabled = true, or name an engine (backprop, forward, zeroth)"
        )
    if traits.seed_steps:
        if engine != traits.seed_engine:
            raise ConfigError(
                f"strategy {name!r} aggregates seed steps of engine {traits.seed_engine!r}: "
                f"set client.engine = {traits.seed_engine!r} (not {engine!r})"
            )
        if scenario.privacy.mode != "none" or scenario.privacy.secure_aggregation:
            raise ConfigError(
                f"strategy {name!r} replays the clients' seed steps, which [privacy] replaces "
                "by one private mean: use strategy.name = 'fedavg' with DP"
            )
    if (
        scenario.gateway.enabled
        and engine == "forward"
        and not (traits.seed_steps and traits.seed_engine == "forward")
    ):
        raise ConfigError(
            f"[gateway] with client.engine = 'forward' under strategy {name!r}: phones run "
            "engine 'forward' only as FwdLLM's probes; use strategy.name = 'fwdllm', or "
            "client.engine = 'backprop' or 'zeroth'"
        )
    if traits.paced and (scenario.privacy.mode != "none" or scenario.privacy.secure_aggregation):
        raise ConfigError(
            f"strategy {name!r} asks for more clients within a round (pacing), which "
            "[privacy]'s sampling and accounting do not allow for: remove [privacy] or use "
            "a strategy without pacing"
        )
    if may_upload_seeds(engine) and not traits.replays_on_sent:
        what = (
            "trains a fresh adapter on merged weights"
            if traits.fresh_adapter
            else (f"keeps LoRA {traits.keeps_local} on each client")
        )
        raise ConfigError(
            f"client.engine = {engine!r}: seed steps replay on the adapter sent, but strategy "
            f"{name!r} {what}; use client.engine = 'backprop' or another strategy"
        )
    if mixed_ranks:
        tiers = ", ".join(f"{tier} (rank {r})" for tier, r in sorted(mixed_ranks.items()))
        if not traits.mixed_ranks:
            raise ConfigError(
                f"strategy {name!r} cannot aggregate adapters of different LoRA ranks, and "
                f"device tiers {tiers} differ from lora.r = {scenario.lora.r}: use a strategy "
                "that mixes ranks (flora, hetlora, flexlora) or set devices.tier_ranks = false"
            )
    _check_privacy(scenario, traits, population)


def _check_privacy(scenario: Scenario, traits: StrategyTraits, population: int) -> None:
    privacy, name = scenario.privacy, scenario.strategy.name
    if privacy.mode == "none" and not privacy.secure_aggregation:
        return
    if traits.mixed_ranks:
        raise ConfigError(
            f"privacy: strategy {name!r} trains clients at several LoRA ranks, whose updates "
            "cannot be clipped or summed together: set privacy.mode = 'none' and "
            "privacy.secure_aggregation = false, or choose another strategy"
        )
    if traits.per_client and privacy.mode != "local":
        raise ConfigError(
            f"privacy: strategy {name!r} needs every client's update, but under "
            f"privacy.mode = {privacy.mode!r} / secure aggregation it sees only their mean: "
            "use a mean-based strategy (fedavg, ffa-lora, fedadam, ...)"
        )
    if privacy.secure_aggregation and scenario.client.wire_dtype != "fp32":
        raise ConfigError(
            f"'client.wire_dtype' must be 'fp32' with privacy.secure_aggregation (masked "
            f"values travel as exact fp32 integers), got {scenario.client.wire_dtype!r}"
        )
    if privacy.secure_aggregation and scenario.round.sampled < 3:
        raise ConfigError(
            "'round.clients_per_round' must be at least 3 with privacy.secure_aggregation "
            "(with two, each learns the other's update from the sum)"
        )
    if privacy.mode != "none" and not privacy.target_delta < 1 / population:
        raise ConfigError(
            f"'privacy.target_delta' = {privacy.target_delta} must be below 1 / population "
            f"= {1 / population:.3g} (a larger delta allows revealing a client outright)"
        )
    if privacy.adaptive:
        count_std = privacy.count_noise or scenario.round.clients_per_round / 20
        if not privacy.noise_multiplier < 2 * count_std:
            raise ConfigError(
                f"'privacy.count_noise' = {count_std:g} (default: round.clients_per_round / "
                f"20) must exceed privacy.noise_multiplier / 2 = {privacy.noise_multiplier / 2:g} "
                "for adaptive clipping"
            )
