"""Checks before a federation starts, and the run folder's creation.

Everything that bad input can break — the model package, the data, every client's
partition, the strategy name, every rule between sections (:mod:`fedtune.checks`) — is
checked here, in the launching process, before any client trains or the run folder is
written, so a mistake costs one clear line and leaves no ``summary.json`` behind. The
rules (:func:`check_rules`, about a second) run before Ray or a SuperLink sees the run;
``fedtune simulate`` runs the slow half (:func:`check_inputs`: imports, tokenizing)
beside Ray's start, and its ServerApp waits for the verdict before touching the folder.
"""

from __future__ import annotations

from pathlib import Path

from fedtune.checks import check_federation
from fedtune.config import Scenario
from fedtune.protocol import traits_of
from fedtune.rundir import RunDirLock, lock_run_dir


def preflight(scenario: Scenario) -> int:
    """Check that ``scenario`` can run; return the number of training clients."""
    clients = check_rules(scenario)
    check_inputs(scenario)
    return clients


def check_rules(scenario: Scenario) -> int:
    """The checks that load no model and tokenize nothing (about a second): libraries,
    the model package, the data and its partitions, the strategy and every rule between
    sections; return the number of training clients. ``fedtune simulate`` runs these
    before Ray starts, and :func:`check_inputs` beside Ray's start."""
    from fedtune.data import build_population
    from fedtune.models import model_dir
    from fedtune.models.base import TINY
    from fedtune.strategies import build_strategy
    from fedtune.tracking import check_trackers

    check_trackers(scenario.tracking)  # a missing tracker library, before the run starts
    if scenario.model.quantization != "none":  # the library, before any process loads it
        from fedtune.models.quantization import require_backend

        require_backend(scenario.model.quantization)
    if scenario.model.name not in TINY:
        model_dir(scenario.model.name)  # converts SmolLM2 once, before actors race for it
    population = build_population(scenario.data)
    if scenario.model.task == "seq-cls":
        from fedtune.data.tasks import check_num_labels

        check_num_labels(scenario.data, scenario.model.num_labels)
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


def check_inputs(scenario: Scenario) -> None:
    """The checks that read the model and tokenize (seconds, mostly imports): the LoRA
    targets exist in the model (weightless), every client's text makes a training
    chunk, the held-out set builds, the evaluation settings hold."""
    from fedtune.data import build_population, client_train_chunks, eval_chunks
    from fedtune.evaluation import check_evaluation
    from fedtune.models import load_tokenizer
    from fedtune.models.targets import check_lora_targets

    check_lora_targets(scenario.model, scenario.lora)  # on a weightless (meta) model, in ~1 s
    population = build_population(scenario.data)
    tokenizer = load_tokenizer(scenario.model.name)
    task, seq_len = scenario.model.task, scenario.client.seq_len
    for client in population.train:
        client_train_chunks(tokenizer, client, scenario.data, seq_len, task)
    eval_chunks(tokenizer, population, scenario.data, seq_len, task)
    check_evaluation(scenario)


def prepare_run_dir(run_dir: Path, resume: bool = False) -> RunDirLock:
    """Create (mode 0700) and lock the run folder for the run's life; refuse a file, a
    folder another process holds, a finished run, or (for a new run) any content.

    Release the returned lock when the run ends (it is a context manager).
    """
    return lock_run_dir(Path(run_dir), new=not resume)
