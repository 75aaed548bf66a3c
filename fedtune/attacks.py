"""Byzantine clients for robustness experiments (``[attack]``).

Which clients attack is a property of the client, fixed for the run: the same set
whatever the strategy, so a comparison of aggregation rules faces the same attackers.
The client applies the attack to its own update after training; the server never
acts on it (it only marks attackers in the ``client_update`` events, for analysis).
"""

from __future__ import annotations

import numpy as np

from fedtune.config import AttackConfig
from fedtune.models.lora import AdapterState

ATTACK_SALT = 0xB12A
"""Mixed into the run seed: the attacker set does not correlate with other draws."""


def attackers(num_clients: int, attack: AttackConfig, seed: int) -> frozenset[int]:
    """The client indices that attack: ``round(fraction * num_clients)`` of them."""
    count = round(attack.fraction * num_clients)
    rng = np.random.default_rng([seed, ATTACK_SALT])
    return frozenset(int(i) for i in rng.permutation(num_clients)[:count])


def attack_update(sent: AdapterState, trained: AdapterState, attack: AttackConfig) -> AdapterState:
    """What an attacker replies instead of ``trained`` (``sent``: the adapter it got)."""
    if attack.kind == "sign-flip":
        return {k: sent[k] - attack.scale * (trained[k] - sent[k]) for k in trained}
    raise ValueError(f"unknown attack {attack.kind!r}")
