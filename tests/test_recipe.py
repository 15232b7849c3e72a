"""Merge recipes (ame_hf/recipe.py): a merge's `ame_config.yaml` given to `merge --config` reproduces it, from
pinned Hub revisions or from local paths, which are read relative to the YAML file wherever it is run from."""

from __future__ import annotations

import os

import pytest
import yaml

from ame_hf import merge
from ame_hf.cli import main
from factories import weights_sha256


def test_reproduce_from_pinned_config(repos, tmp_path, capsys):
    first = merge(["org/hub-a@v2", "org/hub-b"], tmp_path / "first", optimizer="adagrad", lr=0.01, progress=False)
    assert main(["merge", "--config", str(first.path / "ame_config.yaml"), "--out", str(tmp_path / "again"),
                 "--quiet"]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (first.path / "model.safetensors").read_bytes()


def test_relative_paths_in_a_config_yaml_are_relative_to_the_yaml(llamas, tmp_path, monkeypatch):
    a, b = llamas[:2]
    first = tmp_path / "runs" / "first"
    assert main(["merge", str(a), str(b), "--out", str(first), "--quiet"]) == 0
    recorded = yaml.safe_load((first / "ame_config.yaml").read_text())["ingredients"]
    assert recorded == [os.path.relpath(p, first) for p in (a, b)]  # relative to the output
    monkeypatch.chdir(first)  # as the YAML's own comment suggests
    assert main(["merge", "--config", "ame_config.yaml", "--out", "../again", "--quiet"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "--config", str(first / "ame_config.yaml"), "--out", "third", "--quiet"]) == 0
    assert weights_sha256(first) == weights_sha256(tmp_path / "runs" / "again") == weights_sha256(tmp_path / "third")


def test_a_relative_base_is_recorded_relative_to_the_output(lm_adapters, tmp_path, monkeypatch):
    """`--base` given relative to the cwd is recorded like the ingredients (relative to the output), so the
    recipe finds the base again wherever it is run from."""
    base = lm_adapters["base"]
    monkeypatch.chdir(base.parent)
    first = tmp_path / "runs" / "first"
    assert main(["merge", *map(str, lm_adapters["adapters"]), "--base", base.name, "--out", str(first),
                 "--optimizer", "sgd", "--quiet"]) == 0
    assert yaml.safe_load((first / "ame_config.yaml").read_text())["base"] == os.path.relpath(base, first)
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "--config", str(first / "ame_config.yaml"), "--out", "again", "--quiet"]) == 0
    import torch
    from factories import load_state

    # The same weights (the header's stamp hashes the references as written, so the files differ there).
    again, before = load_state(tmp_path / "again"), load_state(first)
    assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in before)


@pytest.mark.parametrize("pivot, source", [("first", "union"), ("Mean", "auto"), ("base", "pivot"), ("mean", "first"),
                                           ("2", "0")])
def test_keywords_in_a_config_yaml_stay_keywords_beside_folders_of_their_name(tmp_path, pivot, source):
    """A folder named like a pivot or tokenizer-source keyword (or an index) sits beside the YAML: the keyword
    keeps its meaning, while a reference that names a folder there is still read relative to the YAML."""
    from ame_hf.config import AmeConfig
    from ame_hf.recipe import read_recipe

    for name in ("union", "first", "mean", "base", "auto", "pivot", "0", "2", "a", "tok"):
        (tmp_path / name).mkdir()
    config = tmp_path / "ame_config.yaml"
    config.write_text(yaml.safe_dump({"ingredients": ["a", "org/b"], "pivot": pivot, "tokenizer_source": source}))
    recipe = read_recipe(config)
    expected = AmeConfig(pivot=pivot, tokenizer_source=source)
    assert (recipe.values["pivot"], recipe.values["tokenizer_source"]) == (expected.pivot, expected.tokenizer_source)
    assert recipe.refs == [str(tmp_path / "a"), "org/b"]

    config.write_text(yaml.safe_dump({"ingredients": ["a"], "pivot": "first/", "tokenizer_source": "tok"}))
    assert read_recipe(config).values == {"pivot": str(tmp_path / "first"), "tokenizer_source": str(tmp_path / "tok")}
