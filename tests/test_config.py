"""`AmeConfig` (ame_hf/config.py): validated, comparable, frozen, and its YAML form round-trips; any text
given to the YAML loader gives a config or an InvalidConfigError, never a crash."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ame_hf import AmeConfig, InvalidConfigError


def test_config_is_validated_comparable_and_round_trips(tmp_path):
    cfg = AmeConfig(optimizer="AdamW", lr=1e-4, epochs=2, pivot="1", seed=3, optimizer_args={"betas": (0.8, 0.9)})
    assert cfg.optimizer == "adamw" and cfg.pivot == 1 and cfg.optimizer_args == {"betas": [0.8, 0.9]}
    assert cfg == AmeConfig(optimizer="adamw", lr=1e-4, epochs=2, pivot=1, seed=3, optimizer_args={"betas": [0.8, 0.9]})
    assert cfg != AmeConfig(optimizer="adamw", lr=1e-4, epochs=2, pivot=1, seed=4, optimizer_args={"betas": [0.8, 0.9]})
    assert AmeConfig.from_yaml(cfg.to_yaml()) == cfg
    path = tmp_path / "cfg"
    path.write_text(cfg.to_yaml())
    assert AmeConfig.from_yaml(str(path)) == cfg == AmeConfig.from_yaml(path)
    assert AmeConfig.soup().is_soup and not AmeConfig().is_soup
    assert AmeConfig().resolved().relative_lr == 0.005 and AmeConfig(optimizer="sgd").resolved().lr == 1.0
    with pytest.raises(InvalidConfigError, match="valid keys"):
        AmeConfig.from_yaml("optimizer: adam\nlearnig_rate: 1\n")
    with pytest.raises(ValueError):  # InvalidConfigError is a ValueError
        AmeConfig(epochs=0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      st.dictionaries(st.sampled_from(["optimizer", "lr", "epochs", "pivot", "seed", "shuffle",
                                                       "optimizer_args", "dtype", "bogus", "batch_size"]),
                                      st.one_of(st.none(), st.integers(-5, 5), st.floats(allow_nan=True),
                                                st.text(max_size=10), st.booleans(), st.lists(st.integers(), max_size=3)),
                                      max_size=6).map(json.dumps)))
def test_fuzz_config_loader(text):
    try:
        AmeConfig.from_yaml(text if "\n" in text else text + "\n")
    except InvalidConfigError:
        pass
