"""The gateway's settings as plain values, its limits, and the error every call ends with."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from fedtune.config import GatewayConfig, Scenario
from fedtune.ondevice.proto import device_pb2 as pb

ARTIFACT_CHUNK = 256 * 1024
"""Bytes per GetArtifact chunk: small enough for a phone on a flaky link to resume often."""
ENGINE_ARTIFACTS = {
    "backprop": ("training_model", "eval_model", "optimizer_model", "checkpoint", "tokenizer"),
    "zeroth": ("inference_model", "tokenizer"),
    "forward": ("inference_model", "tokenizer"),
}
"""The artifacts a phone downloads for each engine it runs (``forward``: FwdLLM's probes,
two-point differences on the inference graph, as ``zeroth``)."""
KEPT_ADAPTERS = 4
"""Adapter blobs kept for download (the latest rounds')."""


class GatewayAbort(Exception):
    """Ends a call with a status code and an ErrorDetail."""

    def __init__(
        self, status: grpc.StatusCode, code: int, message: str, retry_after: int = 0
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = pb.ErrorDetail(
            code=code,  # type: ignore[arg-type]  # the enum's int values (pb.BAD_UPDATE, ...)
            message=message,
            retry_after_seconds=retry_after,
        )


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway needs, as plain values (see :func:`settings_for`)."""

    config: GatewayConfig
    client_indices: tuple[int, ...]
    """The client indices phones enroll as, in order."""

    @property
    def max_chunk_bytes(self) -> int:
        return self.config.max_chunk_kb * 1024


def settings_for(scenario: Scenario, population: int) -> GatewaySettings:
    """The gateway's settings from a scenario: phones take client indices from
    ``gateway.first_client`` up to ``max_devices`` of them (or the population's end)."""
    cfg = scenario.gateway
    end = population if not cfg.max_devices else min(population, cfg.first_client + cfg.max_devices)
    return GatewaySettings(config=cfg, client_indices=tuple(range(cfg.first_client, end)))
