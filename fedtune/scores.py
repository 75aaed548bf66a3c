"""Generation metrics, registered by name like strategies (``[evaluation] metrics``).

A metric is a callable ``(predictions, references) -> float`` (higher is better, in
[0, 1] for the built-ins), registered in the entry-point group ``fedtune.metrics``
of any installed package::

    [project.entry-points."fedtune.metrics"]
    my-score = "my_package.scores:my_score"

Built in: ``exact-match`` (SQuAD's normalisation: case, punctuation, articles and
spacing ignored) and ``rouge-l`` (the F-measure of Google's ``rouge-score``, as
FedKSeed reports it; its tokenizer keeps ASCII letters and digits only, so use it on
English text).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from fedtune.errors import ConfigError

GROUP = "fedtune.metrics"
Metric = Callable[[Sequence[str], Sequence[str]], float]

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, one space."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after :func:`normalize`."""
    pairs = list(zip(predictions, references, strict=True))
    return sum(normalize(p) == normalize(r) for p, r in pairs) / max(len(pairs), 1)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence), stemmed, as in rouge-score."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = list(zip(predictions, references, strict=True))
    total = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs)
    return total / max(len(pairs), 1)


BUILTINS: dict[str, Metric] = {"exact-match": exact_match, "rouge-l": rouge_l}


def get_metric(name: str) -> Metric:
    """The metric registered as ``name`` (built in, or by an installed entry point)."""
    if name in BUILTINS:
        return BUILTINS[name]
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            metric = ep.load()
            if not callable(metric):
                raise ConfigError(f"metric {name!r} ({ep.value}) is not callable")
            return metric
    known = sorted({*BUILTINS, *(ep.name for ep in entry_points(group=GROUP))})
    raise ConfigError(
        f"unknown evaluation.metrics name {name!r}: registered are {', '.join(known)} "
        f"(entry-point group {GROUP!r})"
    )
