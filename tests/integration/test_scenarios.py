"""Every shipped scenario loads and passes the preflight with a tiny model (STYLE rule 6)."""

from __future__ import annotations

import pytest

from fedtune.config import load_scenario, shipped_scenarios
from fedtune.server.preflight import preflight


@pytest.mark.parametrize("name", sorted(shipped_scenarios()))
def test_shipped_scenario_builds(name):
    scenario = load_scenario(name, ["model.name=tiny-llama"])
    population = preflight(scenario)
    assert population >= scenario.round.clients_per_round
    assert scenario.to_toml()
