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
adapter goes next time. Which replies are seed steps (zeroth clients, and FwdLLM's
probing ``forward`` clients) is :attr:`fedtune.protocol.TrainInstructions.uploads_seeds`.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from fedtune.engines.seeds import (
    SeedStep,
    adapter_digest,
    history_is_smaller,
    replay,
    seed_pool,
)
from fedtune.models.lora import AdapterState
from fedtune.protocol import ARRAYS_KEY, SEEDS_KEY, TrainInstructions
from fedtune.wire import check_seed_reply, seeds_to_record


class SeedSync:
    """Seed-step uploads and catch-up downloads for one run."""

    def __init__(
        self,
        run_seed: int,
        num_seeds: int,
        lr: float,
        local_steps: int,
        held: dict[int, int] | None = None,
    ) -> None:
        self.num_seeds = num_seeds
        self.pool = seed_pool(run_seed, num_seeds)
        self.lr = lr
        self.local_steps = local_steps
        self.held: dict[int, int] = dict(held or {})
        """Client index -> the adapter version it holds (what it last replied to);
        checkpointed with the run's state."""

    def offer(
        self,
        asked: TrainInstructions,
        content: RecordDict,
        client: int,
        state: AdapterState,
        history: list[list[SeedStep]],
    ) -> TrainInstructions:
        """A zeroth client's instructions under a step-keeping strategy: the adapter
        version it will hold and, when it holds an older one and the steps since are
        fewer bytes, those steps in place of the adapter (``content`` is changed)."""
        version = len(history)
        asked = asked.but(adapter_version=version)
        held = self.held.get(client)
        if held is not None and held <= version:
            steps = [step for steps in history[held:] for step in steps]
            if history_is_smaller(len(steps), state):
                del content[ARRAYS_KEY]
                content[SEEDS_KEY] = seeds_to_record(steps)
                asked = asked.but(catch_up_from=held, adapter_digest=adapter_digest(state))
        return asked

    def receive(
        self, asked: TrainInstructions, reply: Message, client: int, state: AdapterState
    ) -> tuple[AdapterState | None, list[SeedStep] | None, str | None]:
        """Validate a seed-step reply and replay its steps on ``state`` (the adapter its
        client was sent): ``(adapter, steps, None)`` or ``(None, None, reason)``.

        A zeroth client's steps are its local steps. FwdLLM's probes ``(index,
        derivative)`` are no steps: what is replayed is the client's own forward-gradient
        estimate as one SGD step, ``w - lr * mean_i g_i z_i`` (what the update-norm bounds
        then judge); the strategy gets the probes as sent.
        """
        if reply.has_error():
            self.held.pop(client, None)  # e.g. a restarted node could not catch up
        steps, reason = check_seed_reply(reply, self.num_seeds, asked.probes or self.local_steps)
        if steps is None:
            return None, None, reason
        if asked.adapter_version is not None:
            self.held[client] = asked.adapter_version
        moves = [(i, g / len(steps)) for i, g in steps] if asked.probes else steps
        adapter = replay(state, moves, self.pool, self.lr, asked.train_only)
        if not all(bool(v.isfinite().all()) for v in adapter.values()):
            return None, None, "seed steps replay to non-finite values"
        return adapter, steps, None

    @staticmethod
    def for_strategy(reply: Message, steps: list[SeedStep], keep: bool = True) -> None:
        """Keep the steps as a config record (strategies read one array record: the
        loop puts the replayed adapter there), or with ``keep = False`` (a strategy
        that aggregates adapters) leave them out: Flower's strategies refuse a round
        whose replies hold different records (``client.engine = "auto"`` mixes
        backprop's adapters with seed steps)."""
        del reply.content[SEEDS_KEY]
        if not keep:
            return
        reply.content[SEEDS_KEY] = ConfigRecord(
            {"index": [i for i, _ in steps], "scalar": [g for _, g in steps]}
        )
