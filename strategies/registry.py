"""Strategies by name: the ``fedtune.strategies`` entry-point group.

An entry point names a Flower :class:`~flwr.serverapp.strategy.Strategy` subclass or a
factory returning one. A third-party package registers its own in its pyproject::

    [project.entry-points."fedtune.strategies"]
    my-rule = "my_package.my_rule:MyRule"

The ``[strategy]`` keys (other than ``name``) arrive as keyword arguments. Client
sampling is the federation's business, not the scenario author's: the keyword
arguments of Flower's FedAvg family that control it (``fraction_train``,
``min_train_nodes``, ...) are filled from ``[round]`` when the strategy accepts them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedtune.errors import StrategyError

GROUP = "fedtune.strategies"

BUILTINS: dict[str, str] = {
    "fedavg": "flwr.serverapp.strategy:FedAvg",
    "fedprox": "flwr.serverapp.strategy:FedProx",
    "fedadam": "fedtune.strategies.fedadam:FedAdam",
    "fedyogi": "flwr.serverapp.strategy:FedYogi",
    "fedavgm": "flwr.serverapp.strategy:FedAvgM",
    "median": "flwr.serverapp.strategy:FedMedian",
    "trimmed-mean": "flwr.serverapp.strategy:FedTrimmedAvg",
    "krum": "flwr.serverapp.strategy:Krum",
    "ffa-lora": "fedtune.strategies.ffa_lora:FfaLora",
    "fedsa-lora": "fedtune.strategies.fedsa_lora:FedSaLora",
    "flora": "fedtune.strategies.flora:Flora",
    "hetlora": "fedtune.strategies.hetlora:HetLora",
    "flexlora": "fedtune.strategies.flexlora:FlexLora",
    "fedkseed": "fedtune.strategies.fedkseed:FedKSeed",
    "fwdllm": "fedtune.strategies.fwdllm:FwdLLM",
}
"""Built-in names; also declared as entry points in fedtune's own pyproject.

Flower's classes are registered as they are where they work in fedtune's loop; a
module of ``fedtune.strategies`` adapts one where they do not (its docstring says why).
"""

SAMPLING_KEYS = (
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
)


PLUMBING_KEYS = (
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
)
"""Flower's FedAvg-family arguments that name records and functions: fedtune's loop
fixes them, so ``fedtune strategies --verbose`` does not offer them."""


@dataclass(frozen=True)
class Registered:
    name: str
    target: str
    """``module:attribute`` of the strategy class or factory."""
    distribution: str
    """The package that registered it."""

    def load(self) -> Any:
        module, _, attr = self.target.partition(":")
        try:
            obj: Any = import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise StrategyError(
                f"strategy {self.name!r} ({self.target}, from {self.distribution}) cannot be "
                f"loaded: {exc}"
            ) from exc
        return obj

    def description(self) -> str:
        doc = inspect.getdoc(self.load()) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def parameters(self) -> dict[str, str]:
        """The ``[strategy]`` keys it accepts, each with its default as written (``""``:
        required), its own first, then those its ``**kwargs`` pass on to a base class;
        the sampling keys (``[round]`` sets them) and :data:`PLUMBING_KEYS` are left out."""
        found: dict[str, str] = {}
        target = self.load()
        funcs = (
            [vars(c)["__init__"] for c in inspect.getmro(target) if "__init__" in vars(c)]
            if inspect.isclass(target)
            else [target]
        )
        for func in funcs:
            try:
                sig = inspect.signature(func)
            except (TypeError, ValueError):  # a builtin's
                break
            named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            for name, p in sig.parameters.items():
                if p.kind in named and name not in ("self", *SAMPLING_KEYS, *PLUMBING_KEYS):
                    default = "" if p.default is p.empty else repr(p.default)
                    found.setdefault(name, default)
            if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
                break
        return found


def registered() -> dict[str, Registered]:
    """Every strategy name: built-ins first, then installed entry points."""
    found = {name: Registered(name, target, "fedtune") for name, target in BUILTINS.items()}
    for ep in entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in found and found[ep.name].target != ep.value:
            raise StrategyError(
                f"strategy name {ep.name!r} from {dist} is already taken by "
                f"{found[ep.name].distribution}; rename it in its entry point"
            )
        found.setdefault(ep.name, Registered(ep.name, ep.value, dist))
    return dict(sorted(found.items()))


def build_strategy(
    name: str, params: dict[str, Any], population: int, clients_per_round: int
) -> Strategy:
    """Instantiate the strategy registered as ``name`` for a federation.

    ``population`` clients exist and ``clients_per_round`` are sampled each round.
    """
    known = registered()
    if name not in known:
        raise StrategyError(
            f"unknown strategy {name!r}: registered are {', '.join(known)} "
            "(see `fedtune strategies`)"
        )
    target = known[name].load()
    clash = sorted(set(params) & set(SAMPLING_KEYS))
    if clash:
        raise StrategyError(
            f"strategy.{clash[0]} is set by the federation: use round.clients_per_round"
        )
    accepted, takes_any = _parameters(target)
    unknown = [k for k in params if not takes_any and k not in accepted]
    if unknown:
        raise StrategyError(
            f"strategy {name!r} has no parameter {unknown[0]!r} "
            f"(it accepts: {', '.join(sorted(accepted - set(SAMPLING_KEYS))) or 'none'})"
        )
    sampling = {
        "fraction_train": clients_per_round / population,
        "min_train_nodes": clients_per_round,
        "min_available_nodes": clients_per_round,
        # The server evaluates the global adapter itself; no federated evaluation.
        "fraction_evaluate": 0.0,
        "min_evaluate_nodes": 0,
    }
    kwargs = {k: v for k, v in sampling.items() if takes_any or k in accepted}
    kwargs.update(params)
    try:
        strategy = target(**kwargs)
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"strategy {name!r} rejected its parameters: {exc}") from exc
    if not isinstance(strategy, Strategy):
        raise StrategyError(
            f"strategy {name!r} ({known[name].target}) gave {type(strategy).__name__}, "
            "not a flwr.serverapp.strategy.Strategy"
        )
    return strategy


def _parameters(target: Any) -> tuple[set[str], bool]:
    """Keyword names ``target`` accepts, and whether it takes ``**kwargs``."""
    func = target.__init__ if inspect.isclass(target) else target
    sig = inspect.signature(func)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {n for n, p in sig.parameters.items() if p.kind in named}
    names.discard("self")
    return names, takes_any
