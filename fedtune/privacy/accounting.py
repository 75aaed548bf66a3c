"""Privacy accounting for user-level DP with a fixed-size sample of clients each round.

fedtune's strategies sample ``m`` of the ``N`` eligible clients uniformly without
replacement (Flower's ``sample_nodes``: ``random.sample``). The matching analysis is the
subsampled Gaussian mechanism without replacement under the *replace-one* neighbouring
relation (``N`` is public): Yu-Xiang Wang, Borja Balle and Shiva Kasiviswanathan,
"Subsampled Rényi Differential Privacy and Analytical Moments Accountant", AISTATS
2019 (arXiv:1808.00087), Theorem 27, as implemented by Google's ``dp-accounting``
(``RdpAccountant`` with ``SampledWithoutReplacementDpEvent``).

Sensitivity. Every client's update is clipped to L2 norm ``C`` and the noise on the sum
has standard deviation ``sigma * C``. Replacing one client can move the sum by up to
``2C`` (from ``u`` to ``-u``), so the event's noise multiplier — noise over L2
sensitivity, as dp-accounting defines it — is ``sigma / 2``. The usual Poisson figure
(add-or-remove, sensitivity ``C``) would understate ε for the sample actually drawn.

Local DP (``mode = "local"``): a client's release is its own clipped, noised update, so
no amplification applies; ε of a client that took part ``k`` times is that of ``k``
Gaussian releases of multiplier ``sigma / 2`` (any two inputs differ by ``2C``).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dp_accounting
from dp_accounting.rdp import RdpAccountant

SAMPLING = "without_replacement"
"""How clients are sampled (the only scheme fedtune's strategies use)."""
REPLACE_ONE_FACTOR = 2.0
"""Replace-one L2 sensitivity of a sum of updates clipped to ``C``, in units of ``C``."""


def sampled_event(noise_multiplier: float, eligible: int, sampled: int) -> Any:
    """One round: ``sampled`` of ``eligible`` clients, the Gaussian on their clipped sum."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / REPLACE_ONE_FACTOR)
    return dp_accounting.SampledWithoutReplacementDpEvent(eligible, sampled, gaussian)


@functools.lru_cache(maxsize=64)
def central_epsilon(
    noise_multiplier: float, delta: float, rounds: tuple[tuple[int, int, int], ...]
) -> float:
    """ε after ``rounds``: ``(eligible, sampled, count)`` triples of identical rounds."""
    if not rounds:
        return 0.0
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for eligible, sampled, count in rounds:
        accountant.compose(sampled_event(noise_multiplier, eligible, sampled), count)
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def local_epsilon(noise_multiplier: float, delta: float, releases: int) -> float:
    """ε of one client after ``releases`` locally noised updates (no amplification)."""
    if releases == 0:
        return 0.0
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / REPLACE_ONE_FACTOR)
    accountant.compose(gaussian, releases)
    return float(accountant.get_epsilon(delta))


@dataclass
class Accountant:
    """The privacy spent so far: a ledger of rounds, turned into ε on demand.

    ``central``: every released round adds ``(eligible, sampled)``. ``local``: every
    sampled client's count of releases grows by one; ε is the largest client's.
    """

    noise_multiplier: float
    delta: float
    local: bool = False
    rounds: Counter[tuple[int, int]] = field(default_factory=Counter)
    """Released rounds by ``(eligible, sampled)``."""
    releases: Counter[int] = field(default_factory=Counter)
    """Local DP: releases per client (by client index)."""

    def epsilon(self, extra: tuple[int, int] | None = None, clients: Sequence[int] = ()) -> float:
        """ε spent so far — or if one more round (``extra``, sent to ``clients``) ran."""
        if self.local:
            counts = Counter(self.releases)
            counts.update(clients)
            return local_epsilon(self.noise_multiplier, self.delta, max(counts.values(), default=0))
        rounds = Counter(self.rounds)
        if extra is not None:
            rounds[extra] += 1
        ledger = tuple(sorted((n, m, count) for (n, m), count in rounds.items()))
        return central_epsilon(self.noise_multiplier, self.delta, ledger)

    def spend(self, eligible: int, sampled: int, clients: Sequence[int]) -> None:
        """Record one released round (its ``clients`` each released once under local DP)."""
        if self.local:
            self.releases.update(clients)
        else:
            self.rounds[(eligible, sampled)] += 1

    @property
    def released(self) -> int:
        """Rounds recorded (central) or the most releases of one client (local)."""
        if self.local:
            return max(self.releases.values(), default=0)
        return sum(self.rounds.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds": [[n, m, c] for (n, m), c in sorted(self.rounds.items())],
            "releases": [[client, c] for client, c in sorted(self.releases.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = Counter({(int(n), int(m)): int(c) for n, m, c in state["rounds"]})
        self.releases = Counter({int(client): int(c) for client, c in state["releases"]})
