"""A fine-tune that ties its head to its embeddings next to one that trains its own head (issue 21 item 5): in any
order the output is untied and its head is AME over each ingredient's head as transformers loads it (the tied one's
is its input embedding); no trained tensor is dropped. Checked against an independent float64 mean and the
whole-model torch.optim reference on `AutoModelForCausalLM.from_pretrained(x).state_dict()`."""

from __future__ import annotations

import json

import pytest
import torch

from ame_hf import AmeConfig, check, merge
from factories import build_base
from test_engine import reference_ame_states
from test_reconcile import perturbed


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """A tied fine-tune, two untied ones (one base), and the tied base: {name: folder}."""
    root = tmp_path_factory.mktemp("heads")
    folders = {"base": root / "base", "tied": root / "tied", "untied": root / "untied", "untied2": root / "untied2"}
    build_base("llama", tie_word_embeddings=True).save_pretrained(folders["base"])
    perturbed(build_base("llama", tie_word_embeddings=True), 1, 0.05).save_pretrained(folders["tied"])
    perturbed(build_base("llama", tie_word_embeddings=False), 2, 0.05).save_pretrained(folders["untied"])
    perturbed(build_base("llama", tie_word_embeddings=False), 3, 0.05).save_pretrained(folders["untied2"])
    return folders


def loaded(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_close(out, expected, atol=1e-6):
    merged = loaded(out)
    assert set(merged) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(merged[name].double(), value.double(), atol=atol), name


@pytest.mark.parametrize("order", [["tied", "untied"], ["untied", "tied"], ["untied", "tied", "untied2"]])
def test_the_soup_of_tied_and_untied_heads_is_the_mean_of_the_loaded_models(heads, tmp_path, order):
    refs = [heads[o] for o in order]
    report = check(refs)
    assert report.ok, report.errors
    assert any(f"{heads['tied']} ties lm_head.weight to model.embed_tokens.weight" in n and "untied" in n
               for n in report.notes), report.notes
    out = merge(refs, tmp_path / "soup", optimizer="sgd", progress=False).path
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    states = [loaded(r) for r in refs]
    assert_close(out, {k: sum(s[k].double() for s in states) / len(states) for k in states[0]})
    merged = loaded(out)
    assert not torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])


@pytest.mark.parametrize("order", [["tied", "untied"], ["untied", "tied"]])
@pytest.mark.parametrize("pivot", ["mean", "first", "base"])
def test_adam_over_tied_and_untied_heads_equals_the_whole_model_reference(heads, tmp_path, order, pivot):
    refs = [heads[o] for o in order]
    config = AmeConfig(optimizer="adam", lr=0.01, epochs=2, pivot=str(heads["base"]) if pivot == "base" else pivot)
    out = merge(refs, tmp_path / "adam", config, progress=False).path
    expected = reference_ame_states([loaded(r) for r in refs], config,
                                    loaded(heads["base"]) if pivot == "base" else None)
    assert_close(out, expected)
