"""The server's side of seed-only (zeroth-order) clients.

Uploads: a zeroth client replies with its ``(seed index, scalar)`` steps
(:data:`~fedtune.wire.SEEDS_KEY`, 8 bytes a step). :meth:`SeedSync.receive` validates
them and replays them on the adapter the client was sent, so the rest of the round —
validation bounds, any strategy, privacy, checkpoints — sees an ordinary adapter; the
steps stay in the reply as a config record for strategies that aggregate steps
(``fedkseed``).

Downloads (FedKSeed's catch-up): when the strategy keeps a history of seed steps per
aggregation (``seed_history``, as ``fedkseed`` does), every zeroth client is told the
adapter's version and keeps its copy; next time it is sampled the server sends, in
place of the adapter, the steps since the version it holds — when they are fewer bytes
— with the digest of the adapter they must rebuild. Which version a client holds is
what it last replied to; a failed catch-up (a restarted node) clears it, and the full
adapter goes next time.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedtune.engines.seeds import (
    SeedStep,
    adapter_digest,
    history_is_smaller,
    replay,
    seed_pool,
)
from fedtune.errors import ConfigError
from fedtune.models.lora import AdapterState
from fedtune.wire import (
    ARRAYS_KEY,
    CATCH_UP_KEY,
    CONFIG_KEY,
    DIGEST_KEY,
    ENGINE_KEY,
    SEEDS_KEY,
    VERSION_KEY,
    check_seed_reply,
    seeds_to_record,
)

SEED_ENGINES = ("zeroth",)
"""Engines whose clients upload seed steps, not adapters."""


class SeedSync:
    """Seed-step uploads and catch-up downloads for one run."""

    def __init__(self, run_seed: int, num_seeds: int, lr: float, local_steps: int) -> None:
        self.num_seeds = num_seeds
        self.pool = seed_pool(run_seed, num_seeds)
        self.lr = lr
        self.local_steps = local_steps
        self.held: dict[int, int] = {}
        """Client index -> the adapter version it holds (what it last replied to)."""

    def send(
        self, message: Message, client: int, engine: str, state: AdapterState, strategy: Any
    ) -> Message:
        """``message`` as it goes to ``client``: with its engine in the config, and for a
        zeroth client of a step-keeping strategy, the adapter version — and the steps
        since the version it holds in place of the adapter, when smaller."""
        config = dict(message.content.config_records[CONFIG_KEY])
        if engine in SEED_ENGINES and (config.get("lora-fresh") or config.get("lora-local")):
            raise ConfigError(
                "the zeroth engine's steps replay on the adapter sent: the strategy's "
                "fresh or client-kept LoRA factors (FLoRA, FedSA-LoRA) cannot be used with it"
            )
        content = RecordDict(dict(message.content.items()))  # messages share one content
        config[ENGINE_KEY] = engine
        history = getattr(strategy, "seed_history", None)
        if engine in SEED_ENGINES and history is not None:
            version = len(history)
            config[VERSION_KEY] = version
            held = self.held.get(client)
            if held is not None and held <= version:
                steps = [step for steps in history[held:] for step in steps]
                if history_is_smaller(len(steps), state):
                    del content[ARRAYS_KEY]
                    content[SEEDS_KEY] = seeds_to_record(steps)
                    config[CATCH_UP_KEY] = held
                    config[DIGEST_KEY] = adapter_digest(state)
        content[CONFIG_KEY] = ConfigRecord(config)
        return Message(
            content=content,
            message_type=message.metadata.message_type,
            dst_node_id=message.metadata.dst_node_id,
        )

    def receive(
        self, sent: Message, reply: Message, client: int, state: AdapterState
    ) -> tuple[AdapterState | None, list[SeedStep] | None, str | None]:
        """Validate a zeroth client's reply and replay its steps on ``state`` (the
        adapter it was sent): ``(adapter, steps, None)`` or ``(None, None, reason)``."""
        config = sent.content.config_records[CONFIG_KEY]
        if reply.has_error():
            self.held.pop(client, None)  # e.g. a restarted node could not catch up
        steps, reason = check_seed_reply(reply, self.num_seeds, self.local_steps)
        if steps is None:
            return None, None, reason
        if VERSION_KEY in config:
            self.held[client] = int(config[VERSION_KEY])
        train_only = str(config.get("lora-train", "all"))
        adapter = replay(state, steps, self.pool, self.lr, train_only)
        if not all(bool(v.isfinite().all()) for v in adapter.values()):
            return None, None, "seed steps replay to non-finite values"
        return adapter, steps, None

    @staticmethod
    def for_strategy(reply: Message, steps: list[SeedStep]) -> None:
        """Keep the steps as a config record (strategies read one array record: the
        loop puts the replayed adapter there)."""
        del reply.content[SEEDS_KEY]
        reply.content[SEEDS_KEY] = ConfigRecord(
            {"index": [i for i, _ in steps], "scalar": [g for _, g in steps]}
        )
