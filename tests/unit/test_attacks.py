"""Byzantine clients: who attacks, and what an attacker sends."""

from __future__ import annotations

import pytest
import torch

from fedtune.attacks import attack_update, attackers
from fedtune.config import AttackConfig, load_scenario
from fedtune.errors import ConfigError


def test_the_attacker_set_is_an_exact_share_fixed_by_the_run_seed():
    attack = AttackConfig(fraction=0.2)
    chosen = attackers(60, attack, seed=0)
    assert len(chosen) == 12 and all(0 <= i < 60 for i in chosen)
    assert attackers(60, attack, seed=0) == chosen
    assert attackers(60, attack, seed=1) != chosen
    assert attackers(60, AttackConfig(fraction=0.0), seed=0) == frozenset()


def test_sign_flip_reverses_and_magnifies_the_update():
    sent = {"a": torch.tensor([1.0, 2.0])}
    trained = {"a": torch.tensor([1.5, 1.0])}
    out = attack_update(sent, trained, AttackConfig(fraction=0.1, scale=10.0))
    assert torch.equal(out["a"], torch.tensor([-4.0, 12.0]))  # 1 - 10*0.5, 2 - 10*(-1)


@pytest.mark.parametrize(
    ("override", "key"),
    [("attack.fraction=1.5", "attack.fraction"), ("attack.kind='noise'", "attack.kind")],
)
def test_bad_attack_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_scenario("tiny", [override])
