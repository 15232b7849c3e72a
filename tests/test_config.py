"""`AmeConfig` (ame_hf/config.py): validated, comparable, frozen, keyword-only, and its YAML form round-trips
through the path `merge --config` reads (`recipe.read_recipe` + `AmeConfig.from_dict`); any text in a YAML file
gives a config or an InvalidConfigError naming the keyword, never a crash; sizes need a unit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ame_hf import AmeConfig, InvalidConfigError
from ame_hf._validators import parse_size
from ame_hf.config import CHECK_FIELDS, OUTPUT_FIELDS, WEIGHT_FIELDS
from ame_hf.recipe import read_recipe


def _read_back(path):
    return AmeConfig.from_dict(read_recipe(path).values)


def test_config_is_validated_comparable_and_round_trips(tmp_path):
    cfg = AmeConfig(optimizer="AdamW", lr=1e-4, epochs=2, pivot="1", seed=3, optimizer_args={"betas": (0.8, 0.9)})
    assert cfg.optimizer == "adamw" and cfg.pivot == 1 and cfg.optimizer_args == {"betas": [0.8, 0.9]}
    assert cfg == AmeConfig(optimizer="adamw", lr=1e-4, epochs=2, pivot=1, seed=3, optimizer_args={"betas": [0.8, 0.9]})
    assert cfg != AmeConfig(optimizer="adamw", lr=1e-4, epochs=2, pivot=1, seed=4, optimizer_args={"betas": [0.8, 0.9]})
    assert AmeConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    path = tmp_path / "ame_config.yaml"
    path.write_text(cfg.to_yaml())
    assert _read_back(path) == cfg
    assert AmeConfig.soup().is_soup and not AmeConfig().is_soup
    assert AmeConfig().resolved().relative_lr == 0.005 and AmeConfig(optimizer="sgd").resolved().lr == 1.0
    path.write_text("optimizer: adam\nlearnig_rate: 1\n")
    with pytest.raises(InvalidConfigError, match="valid keys"):
        _read_back(path)
    with pytest.raises(ValueError):  # InvalidConfigError is a ValueError
        AmeConfig(epochs=0)


def test_config_takes_keywords_only():
    with pytest.raises(TypeError):
        AmeConfig("adam")  # noqa: the optimizer must be named
    assert AmeConfig(optimizer="adam") == AmeConfig()


@pytest.mark.parametrize("options,field,needle", [
    ({"epochs": 0}, "epochs", "epochs must be a whole number >= 1, got 0"),
    ({"lr": 1e-4, "relative_lr": 0.01}, "relative_lr", "give either lr or relative_lr"),
    ({"optimizer": "adamm"}, "optimizer", "did you mean adam?"),
    ({"optimizer": "lbfgs"}, "optimizer", "closure"),
    ({"max_shard_size": "5"}, "max_shard_size", "max_shard_size '5' has no unit"),
    ({"max_shard_size": "5 parsecs"}, "max_shard_size", "invalid max_shard_size '5 parsecs'"),
    ({"seed": -1}, "seed", "seed must be a whole number >= 0"),
    ({"pivot": -2}, "pivot", "pivot index must be >= 0"),
    ({"order": "2,2"}, "order", "each ingredient index once"),
    ({"dtype": "fp16"}, "dtype", "unknown dtype 'fp16'"),
    ({"variant": "a.b"}, "variant", "plain name"),
    ({"optimizer_args": "{betas"}, "optimizer_args", "optimizer_args is not valid JSON"),
    ({"optimizer_args": {"lr": 1}}, "optimizer_args", "not inside optimizer_args"),
    ({"optimizer_args": {"betaz": 1}}, "optimizer_args", "betas"),
])
def test_errors_name_the_keyword_and_never_a_flag(options, field, needle):
    with pytest.raises(InvalidConfigError) as caught:
        AmeConfig(**options)
    assert caught.value.field == field and needle in str(caught.value), str(caught.value)
    assert "--" not in str(caught.value), "a Python error names keywords, not CLI flags"


def test_a_size_string_needs_its_unit_and_an_int_is_bytes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("5B") == 5
    assert parse_size(1000) == 1000 and AmeConfig(max_shard_size=1000).max_shard_size == 1000
    for bad in ("5", " 12 ", "1.5", True, 0, -3, 2.5):
        with pytest.raises(InvalidConfigError):
            parse_size(bad)


def test_the_fields_split_into_what_decides_the_steps_and_what_reads_and_writes():
    names = [f.name for f in dataclasses.fields(AmeConfig)]
    assert sorted(WEIGHT_FIELDS + OUTPUT_FIELDS) == sorted(names) and not set(WEIGHT_FIELDS) & set(OUTPUT_FIELDS)
    assert set(CHECK_FIELDS) <= set(names)
    assert "base" in OUTPUT_FIELDS and "tokenizer_source" in OUTPUT_FIELDS and "optimizer" in WEIGHT_FIELDS


def test_from_dict_suggests_the_closest_key():
    with pytest.raises(InvalidConfigError, match=r"relativ_lr \(did you mean relative_lr\?\)"):
        AmeConfig.from_dict({"relativ_lr": 0.1})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      st.dictionaries(st.sampled_from(["optimizer", "lr", "epochs", "pivot", "seed", "shuffle",
                                                       "optimizer_args", "dtype", "bogus", "batch_size",
                                                       "max_shard_size"]),
                                      st.one_of(st.none(), st.integers(-5, 5), st.floats(allow_nan=True),
                                                st.text(max_size=10), st.booleans(), st.lists(st.integers(), max_size=3)),
                                      max_size=6).map(json.dumps)))
def test_fuzz_config_file(tmp_path, text):
    path = tmp_path / "ame_config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        _read_back(path)
    except InvalidConfigError:
        pass
