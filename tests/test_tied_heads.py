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


def store_head(folder, seed=None):
    """Add `lm_head.weight` to a tied fine-tune's weights, its config still tying it: the embedding moved by seeded
    noise (transformers 5 then loads it untied: the stored head), or (`seed` None) the embedding's own values (tied)."""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    head = state["model.embed_tokens.weight"].clone()
    if seed is not None:
        head += torch.randn(head.shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    save_file({**state, "lm_head.weight": head}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def stored_heads(tmp_path_factory):
    """Fine-tunes whose config ties (tie_word_embeddings true): `tied` saved as usual, `stored` and `stored2` with a
    stored lm_head.weight of other values, `same` with one equal to its embedding: {name: folder}."""
    root = tmp_path_factory.mktemp("stored")
    folders = {}
    for i, name in enumerate(("tied", "stored", "stored2", "same")):
        folders[name] = root / name
        perturbed(build_base("llama", tie_word_embeddings=True), 10 + i, 0.05).save_pretrained(folders[name])
    store_head(folders["stored"], 1), store_head(folders["stored2"], 2), store_head(folders["same"])
    return folders


def test_transformers_loads_a_stored_head_that_differs_untied(stored_heads):
    """What the merge must match (transformers 5): a tied config whose checkpoint stores a head of other values
    loads that head; one that stores its embedding's values loads tied."""
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_pretrained(stored_heads["stored"])
    assert model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, load_file(stored_heads["stored"] / "model.safetensors")["lm_head.weight"])
    same = AutoModelForCausalLM.from_pretrained(stored_heads["same"])
    assert same.lm_head.weight is same.model.embed_tokens.weight


@pytest.mark.parametrize("order", [["tied", "stored"], ["stored", "tied"], ["stored", "stored2"],
                                   ["same", "stored", "tied"], ["untied", "stored"]])
def test_a_stored_head_of_a_tied_config_merges_as_transformers_loads_it(stored_heads, heads, tmp_path, order):
    refs = [{**heads, **stored_heads}[o] for o in order]
    report = check(refs)
    assert report.ok, report.errors
    assert any(f"{stored_heads['stored']} stores lm_head.weight" in n for n in report.notes), report.notes
    out = merge(refs, tmp_path / "soup", optimizer="sgd", progress=False).path
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    states = [loaded(r) for r in refs]
    assert_close(out, {k: sum(s[k].double() for s in states) / len(states) for k in states[0]})
    config = AmeConfig(optimizer="adam", lr=0.01, epochs=2, pivot="first")
    out = merge(refs, tmp_path / "adam", config, progress=False).path
    assert_close(out, reference_ame_states(states, config))


def test_a_stored_head_equal_to_its_embedding_stays_tied(stored_heads, tmp_path):
    refs = [stored_heads["same"], stored_heads["tied"]]
    assert check(refs).ok
    out = merge(refs, tmp_path / "soup", optimizer="sgd", progress=False).path
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    states = [loaded(r) for r in refs]
    assert_close(out, {k: sum(s[k].double() for s in states) / len(states) for k in states[0]})


def test_a_hub_ingredient_whose_stored_head_differs_is_seen_at_download(stored_heads, hub, hub_token, tmp_path):
    """From the Hub the check reads headers only: the stored head's values are compared once downloaded, before the
    merge, and the merge is the one transformers' loading asks for."""
    from huggingface_hub import HfApi

    api = HfApi(token=hub_token)
    repos = []
    for name in ("tied", "stored"):
        repos.append(f"org/tied-head-{name}")
        api.create_repo(repos[-1], exist_ok=True)
        api.upload_folder(repo_id=repos[-1], folder_path=stored_heads[name])
    assert check(repos).ok
    out = merge(repos, tmp_path / "soup", optimizer="sgd", progress=False).path
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    states = [loaded(stored_heads[n]) for n in ("tied", "stored")]
    assert_close(out, {k: sum(s[k].double() for s in states) / len(states) for k in states[0]})


@pytest.mark.parametrize("pivot", ["base", "mean"])
def test_stored_heads_of_every_ingredient_start_from_the_loaded_head_of_a_tied_pivot(stored_heads, heads, tmp_path,
                                                                                    pivot):
    """Every ingredient loads untied (none ties): the output is untied all the same, and a tied base as the pivot
    starts the head from its embedding, as transformers loads it."""
    refs = [stored_heads["stored"], stored_heads["stored2"]]
    config = AmeConfig(optimizer="adam", lr=0.01, epochs=2, pivot=str(heads["base"]) if pivot == "base" else pivot)
    assert check(refs, pivot=config.pivot).ok
    out = merge(refs, tmp_path / "adam", config, progress=False).path
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    expected = reference_ame_states([loaded(r) for r in refs], config,
                                    loaded(heads["base"]) if pivot == "base" else None)
    assert_close(out, expected)


def test_an_adapter_of_a_base_whose_stored_head_differs_merges_as_peft_loads_it(stored_heads, tmp_path):
    """A LoRA adapter over the `stored` base (transformers loads it untied, then peft merges into it) with a full
    fine-tune that ties: the mean of peft's `merge_and_unload()` and the tied fine-tune as loaded."""
    from test_adapter_forms import assert_mean, make_adapter, peft_model_of

    adapter = make_adapter(stored_heads["stored"], tmp_path / "lora", 5, target_modules=["q_proj", "v_proj"])
    refs = [adapter, stored_heads["tied"]]
    report = check(refs)
    assert report.ok, report.errors
    out = merge(refs, tmp_path / "soup", optimizer="sgd", progress=False).path
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert_mean(out, [peft_model_of(stored_heads["stored"], adapter), loaded(stored_heads["tied"])])
