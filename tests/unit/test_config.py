from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import (
    Scenario,
    client_spec,
    load_scenario,
    parse_override,
    scenario_from_client_spec,
    shipped_scenarios,
)
from fedtune.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_shipped_scenarios_include_quickstart_and_load():
    names = shipped_scenarios()
    assert "quickstart" in names
    for name in names:
        scenario = load_scenario(name)
        assert scenario.name == name


def test_default_scenario_is_quickstart():
    assert load_scenario().name == "quickstart"


def test_overrides_are_typed():
    s = load_scenario(
        "quickstart",
        [
            "run.rounds=7",
            "client.lr=1e-4",
            'lora.targets=["q_proj"]',
            "model.name=tiny-llama",
            "strategy.eta=0.5",
        ],
    )
    assert s.run.rounds == 7
    assert s.client.lr == pytest.approx(1e-4)
    assert s.lora.targets == ("q_proj",)
    assert s.model.name == "tiny-llama"
    assert s.strategy.params["eta"] == 0.5


def test_int_is_accepted_for_float():
    s = load_scenario("quickstart", ["client.lr=1"])
    assert isinstance(s.client.lr, float)


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "[data]\nmin_char = 3\n")
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    assert "data.min_char" in str(err.value)
    assert str(path) in str(err.value)
    assert "did you mean 'data.min_chars'" in str(err.value)


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, '[run]\nrounds = "three"\n')
    with pytest.raises(ConfigError, match=r"s\.toml.*'run\.rounds' must be int"):
        load_scenario(path)


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match="run.rounds"):
        load_scenario(write(tmp_path, "[run]\nrounds = true\n"))


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[modle\].*model"):
        load_scenario(write(tmp_path, "[modle]\nname = 'x'\n"))


def test_invalid_value_names_key_and_file(tmp_path):
    path = write(tmp_path, "[round]\nclients_per_round = 2\nmin_reports = 3\n")
    with pytest.raises(ConfigError, match=r"s\.toml: 'round\.min_reports'"):
        load_scenario(path)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("run.rounds")
    with pytest.raises(ConfigError, match=r"override --set run.roundz=2: unknown key 'run.roundz'"):
        load_scenario("quickstart", ["run.roundz=2"])
    with pytest.raises(ConfigError, match=r"--set run.rounds=x: 'run.rounds' must be int"):
        load_scenario("quickstart", ["run.rounds=x"])
    with pytest.raises(ConfigError, match=r"--set run.rounds=0: 'run.rounds' must be at least"):
        load_scenario("quickstart", ["run.rounds=0"])
    with pytest.raises(ConfigError, match="must be section.key"):
        parse_override("rounds=2")


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(write(tmp_path, "[run\n"))


def test_unknown_scenario_name():
    with pytest.raises(ConfigError, match="unknown scenario 'nope'.*quickstart"):
        load_scenario("nope")


def test_to_toml_round_trips(tmp_path):
    s = load_scenario("quickstart", ["strategy.eta=0.25", "run.seed=9"])
    path = tmp_path / "quickstart.toml"
    path.write_text(s.to_toml())
    again = load_scenario(path)
    assert again == s
    assert again.digest() == s.digest()


def test_digest_changes_with_config():
    a = load_scenario("quickstart")
    b = load_scenario("quickstart", ["run.seed=1"])
    assert a.digest() != b.digest()


def test_client_spec_round_trip():
    s = load_scenario("quickstart", ["lora.r=4", "data.num_clients=5"])
    back = scenario_from_client_spec(client_spec(s))
    for section in ("model", "lora", "data", "client"):
        assert getattr(back, section) == getattr(s, section)
    assert back.run.seed == s.run.seed


def test_scenario_is_frozen():
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        Scenario().run.rounds = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("client.engine='mezo'", "client.engine"),
        ("client.eps=-1e-3", "client.eps"),
        ("client.num_seeds=0", "client.num_seeds"),
        ("client.perturbations=20", "client.perturbations"),  # > max_perturbations
        ("client.forward_derivative='central'", "client.forward_derivative"),
        ("client.forward_optimizer='lion'", "client.forward_optimizer"),
    ],
)
def test_bad_engine_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_scenario("tiny", [override])


def test_jvp_on_a_packed_4_bit_base_is_refused_with_the_way_out():
    for quantization in ("nf4", "int4"):
        overrides = ["client.engine='forward'", f"model.quantization={quantization!r}"]
        with pytest.raises(ConfigError, match="client.forward_derivative.*'fd'"):
            load_scenario("tiny", overrides)
        load_scenario("tiny", [*overrides, "client.forward_derivative='fd'"])
    load_scenario("tiny", ["client.engine='forward'", "model.quantization='int8'"])


def test_dynamic_int8_artifacts_need_zeroth_phones():
    gateway = ["gateway.enabled=true", "gateway.token=long-enough", "gateway.artifact_int8=dynamic"]
    with pytest.raises(ConfigError, match=r"gateway\.artifact_int8.*'dynamic' with client\.engine"):
        load_scenario("tiny", gateway)
    assert load_scenario("tiny", [*gateway, "client.engine=zeroth"]).gateway.artifact_int8 == (
        "dynamic"
    )
    # FwdLLM's probes are inference too (a local forward engine is refused by
    # check_federation: phones run 'forward' only under fwdllm).
    load_scenario("tiny", [*gateway, "client.engine=forward"])
    with pytest.raises(ConfigError, match="gateway.artifact_int8"):
        load_scenario("tiny", ["gateway.artifact_int8=int4"])
