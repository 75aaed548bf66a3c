from __future__ import annotations

import pytest
from flwr.serverapp.strategy import FedAvg

from fedtune.errors import StrategyError
from fedtune.strategies import build_strategy, registered


def test_fedavg_is_registered_with_a_description():
    entries = registered()
    assert "fedavg" in entries
    assert entries["fedavg"].description()


def test_build_fills_sampling_from_the_round():
    strategy = build_strategy("fedavg", {}, population=20, clients_per_round=3)
    assert isinstance(strategy, FedAvg)
    assert strategy.min_train_nodes == 3
    assert int(20 * strategy.fraction_train) <= 3
    assert strategy.fraction_evaluate == 0.0


def test_parameters_are_passed():
    strategy = build_strategy("fedavg", {"weighted_by_key": "w"}, population=4, clients_per_round=2)
    assert strategy.weighted_by_key == "w"


def test_unknown_strategy():
    with pytest.raises(StrategyError, match="unknown strategy 'fedavgx'.*fedavg"):
        build_strategy("fedavgx", {}, population=4, clients_per_round=2)


def test_unknown_parameter():
    with pytest.raises(StrategyError, match="no parameter 'lr'"):
        build_strategy("fedavg", {"lr": 1}, population=4, clients_per_round=2)


def test_sampling_keys_belong_to_the_federation():
    with pytest.raises(StrategyError, match="round.clients_per_round"):
        build_strategy("fedavg", {"fraction_train": 0.5}, population=4, clients_per_round=2)
