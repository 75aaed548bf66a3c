"""Checks before a federation starts, and the run folder's creation.

Everything that bad input can break — the model package, the data, every client's
partition, the strategy name, every rule between sections (:mod:`fedtune.checks`) — is
checked here, in the launching process, before Ray
or a SuperLink sees the run, so a mistake costs a second and one clear line, and
leaves no ``summary.json`` behind.
"""

from __future__ import annotations

from pathlib import Path

from fedtune.checks import check_federation
from fedtune.config import Scenario
from fedtune.protocol import traits_of
from fedtune.rundir import RunDirLock, lock_run_dir


def preflight(scenario: Scenario) -> int:
    """Check that ``scenario`` can run; return the number of training clients."""
    from fedtune.data import build_population, client_train_chunks, eval_chunks
    from fedtune.evaluation import check_evaluation
    from fedtune.models import load_tokenizer, model_dir
    from fedtune.models.base import TINY
    from fedtune.models.targets import check_lora_targets
    from fedtune.strategies import build_strategy
    from fedtune.tracking import check_trackers

    check_trackers(scenario.tracking)  # a missing tracker library, before the run starts
    if scenario.model.quantization != "none":  # the library, before any process loads it
        from fedtune.models.quantization import require_backend

        require_backend(scenario.model.quantization)
    if scenario.model.name not in TINY:
        model_dir(scenario.model.name)  # converts SmolLM2 once, before actors race for it
    check_lora_targets(scenario.model, scenario.lora)  # on a weightless (meta) model, in ~1 s
    population = build_population(scenario.data)
    tokenizer = load_tokenizer(scenario.model.name)
    task, seq_len = scenario.model.task, scenario.client.seq_len
    if task == "seq-cls":
        from fedtune.data.tasks import check_num_labels

        check_num_labels(scenario.data, scenario.model.num_labels)
    for client in population.train:
        client_train_chunks(tokenizer, client, scenario.data, seq_len, task)
    eval_chunks(tokenizer, population, scenario.data, seq_len, task)
    check_evaluation(scenario)
    strategy = build_strategy(
        scenario.strategy.name,
        dict(scenario.strategy.params),
        population=len(population.train),
        clients_per_round=scenario.round.sampled,
    )
    mixed: dict[str, int] = {}
    if scenario.devices.enabled:
        from fedtune.server.fleet import Fleet

        mixed = Fleet.from_scenario(scenario, len(population.train)).mixed_ranks(scenario.lora.r)
    check_federation(scenario, traits_of(strategy), len(population.train), mixed)
    return len(population.train)


def prepare_run_dir(run_dir: Path, resume: bool = False) -> RunDirLock:
    """Create (mode 0700) and lock the run folder for the run's life; refuse a file, a
    folder another process holds, a finished run, or (for a new run) any content.

    Release the returned lock when the run ends (it is a context manager).
    """
    return lock_run_dir(Path(run_dir), new=not resume)
