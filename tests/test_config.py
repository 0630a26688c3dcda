import subprocess
import sys

import pytest

from privbench.attacks.gradient_inversion import GradientInversionParams
from privbench.config import Budget, ConfigError, RunConfig, coerce_params, parse_assignments, resolve


def test_hash_ignores_param_order_and_changes_with_content():
    a = RunConfig(attack_params={"steps": 10, "lr": 0.5})
    b = RunConfig(attack_params={"lr": 0.5, "steps": 10})
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != RunConfig(attack_params={"steps": 11, "lr": 0.5}).config_hash()
    assert a.config_hash() != RunConfig(attack_params={"steps": 10, "lr": 0.5}, seed=1).config_hash()
    assert RunConfig().config_hash() != RunConfig(budget=Budget(100)).config_hash()


def test_hash_is_stable_across_processes():
    code = "from privbench.config import RunConfig; print(RunConfig(attack_params={'steps': 3}, seed=4).config_hash())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == RunConfig(attack_params={"steps": 3}, seed=4).config_hash()


def test_round_trip_through_dict():
    cfg = RunConfig(defense="none", attack="invgrad", attack_params={"steps": 5}, budget=Budget(7))
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_resolve_types_and_fills_defaults():
    cfg = resolve(RunConfig(attack="dlg", attack_params={"steps": "12", "boxed": "true"}))
    params = dict(cfg.attack_params)
    assert params["steps"] == 12 and params["boxed"] is True
    assert params["restarts"] == 2 and params["distance"] == "l2"
    # explicit defaults and omitted defaults resolve to the same config
    assert resolve(RunConfig(attack_params={"restarts": "2"})).config_hash() == resolve(RunConfig()).config_hash()


def test_ill_typed_parameter_names_the_parameter_and_type():
    with pytest.raises(ConfigError, match="parameter 'steps' expects int, got 'abc'"):
        coerce_params(GradientInversionParams, {"steps": "abc"}, "attack 'dlg'")
    with pytest.raises(ConfigError, match="'distance' expects one of 'l2', 'cosine'"):
        coerce_params(GradientInversionParams, {"distance": "manhattan"}, "attack 'dlg'")


def test_unknown_parameter_suggests_close_names():
    with pytest.raises(ConfigError, match="no parameter 'step'.*Did you mean 'steps'"):
        coerce_params(GradientInversionParams, {"step": "3"}, "attack 'dlg'")


def test_parameter_value_checks_run():
    with pytest.raises(ConfigError, match=r"'restarts' must be in \[1, 10\^4\], got 0"):
        coerce_params(GradientInversionParams, {"restarts": "0"}, "attack 'dlg'")


def test_assignments_need_key_and_value():
    assert parse_assignments(["a=1", "b = x"], "--p") == {"a": "1", "b": "x"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_assignments(["nonsense"], "--attack-param")


@pytest.mark.parametrize("field,value", [("channels", 2), ("image_size", 0), ("gradient_round", "later"), ("seed", -1)])
def test_bad_config_fields_raise(field, value):
    with pytest.raises(ConfigError, match=field):
        RunConfig(**{field: value})


def test_target_seed_fixes_the_target_while_seed_picks_victim_and_attack():
    a, b = RunConfig(seed=1, target_seed=7), RunConfig(seed=2, target_seed=7)
    sa, sb = a.derived_seeds(), b.derived_seeds()
    assert sa["init"] == sb["init"] == RunConfig(seed=7).derived_seeds()["init"]
    assert sa["train"] == sb["train"]
    assert sa["victim"] != sb["victim"] and sa["attack"] != sb["attack"]
    assert a.config_hash() != b.config_hash()
    assert RunConfig.from_dict(a.to_dict()) == a


def test_unset_target_seed_leaves_the_config_dict_and_hash_as_before():
    cfg = RunConfig(seed=3)
    assert "target_seed" not in cfg.to_dict() and cfg.trained_target_seed == 3
    assert cfg.config_hash() != RunConfig(seed=3, target_seed=3).config_hash()  # explicit is a different request
    assert cfg.derived_seeds() == RunConfig(seed=3, target_seed=3).derived_seeds()
