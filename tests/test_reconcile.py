"""Layouts transformers accepts are merged (ame_hf/reconcile.py): tied aliases stored by old `.bin` files, a
stored `position_ids` buffer, a base model saved without its head's prefix, a `*ForMaskedLM` base as the
pivot of `*ForSequenceClassification` fine-tunes. Checked against transformers' own loading: the soup of
the loaded models' parameters equals the merge loaded with `from_pretrained`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ame_hf import check, merge
from ame_hf.cli import main


def perturbed(model, seed: int, scale: float = 0.02):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def mean_params(models) -> dict[str, torch.Tensor]:
    states = [{k: v.double() for k, v in m.state_dict().items() if v.is_floating_point()} for m in models]
    return {k: sum(s[k] for s in states) / len(states) for k in states[0]}


def assert_soup(out, cls, models):
    merged = cls.from_pretrained(out)
    expected = mean_params(models)
    for key, value in merged.state_dict().items():
        if key in expected:
            assert torch.allclose(value.double(), expected[key], atol=1e-6), key


def test_old_bin_with_tied_aliases_next_to_safetensors_without_them(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                      decoder_start_token_id=0)
    torch.manual_seed(0)
    a, b = perturbed(T5ForConditionalGeneration(config), 1), perturbed(T5ForConditionalGeneration(config), 2)
    old = tmp_path / "old"
    old.mkdir()
    state = a.state_dict()  # every alias: shared, encoder/decoder.embed_tokens, lm_head
    assert {"encoder.embed_tokens.weight", "lm_head.weight", "shared.weight"} <= set(state)
    torch.save({k: v.clone() for k, v in state.items()}, old / "pytorch_model.bin")
    a.config.to_json_file(old / "config.json")  # (no `architectures`, as in some older saves)
    b.save_pretrained(tmp_path / "new")
    assert "lm_head.weight" not in load_file(tmp_path / "new" / "model.safetensors")
    report = check([old, tmp_path / "new"])
    assert report.ok, report.errors
    assert any("encoder.embed_tokens.weight" in n and "tied to shared.weight" in n for n in report.notes)
    out = merge([old, tmp_path / "new"], tmp_path / "out", optimizer="sgd", progress=False).path
    assert set(load_file(out / "model.safetensors")) == set(load_file(tmp_path / "new" / "model.safetensors"))
    assert_soup(out, T5ForConditionalGeneration, [a, b])


def test_a_stored_position_ids_buffer_in_one_bert_only(tmp_path):
    from factories import make_finetunes

    a, b = make_finetunes(tmp_path / "ft", n=2, kind="bert")
    state = load_file(a / "model.safetensors")
    state["bert.embeddings.position_ids"] = torch.arange(32).unsqueeze(0)  # as older transformers stored it
    save_file(state, a / "model.safetensors", metadata={"format": "pt"})
    report = check([a, b])
    assert report.ok, report.errors
    assert any("position_ids" in n and "ignored" in n for n in report.notes)
    out = merge([a, b], tmp_path / "out", optimizer="sgd", progress=False).path
    assert "bert.embeddings.position_ids" not in load_file(out / "model.safetensors")


@pytest.mark.parametrize("base_first", [True, False])
def test_gpt2_base_model_next_to_the_lm_head_model(tmp_path, base_first):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    config = GPT2Config(vocab_size=24, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    lm = perturbed(GPT2LMHeadModel(config), 1)
    base = perturbed(GPT2Model(config), 2)
    lm.save_pretrained(tmp_path / "lm")
    base.save_pretrained(tmp_path / "base")
    assert all(k.startswith(("h.", "wte", "wpe", "ln_f")) for k in load_file(tmp_path / "base" / "model.safetensors"))
    refs = [tmp_path / "base", tmp_path / "lm"] if base_first else [tmp_path / "lm", tmp_path / "base"]
    report = check(refs)
    assert report.ok, report.errors
    assert any("base-model prefix 'transformer'" in n for n in report.notes)
    out = merge(refs, tmp_path / "out", optimizer="sgd", progress=False).path
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    merged = GPT2LMHeadModel.from_pretrained(out)
    expected = mean_params([lm.transformer, base])
    for key, value in merged.transformer.state_dict().items():
        if key in expected:
            assert torch.allclose(value.double(), expected[key], atol=1e-6), key


def test_a_masked_lm_base_as_pivot_of_sequence_classifiers(tmp_path, capsys):
    from transformers import BertForMaskedLM, BertForSequenceClassification

    from factories import tiny_bert_config

    torch.manual_seed(0)
    base = BertForMaskedLM(tiny_bert_config())
    base.save_pretrained(tmp_path / "base")
    fts = []
    for i in range(2):
        ft = BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
        perturbed(ft, 10 + i).save_pretrained(tmp_path / f"ft{i}")
        fts.append(ft)
    report = check([tmp_path / "ft0", tmp_path / "ft1"], pivot=tmp_path / "base")
    assert report.ok, report.errors
    assert any("lacks tensor(s)" in n and "classifier.weight" in n for n in report.notes)
    assert any("cls.predictions" in n and "not used" in n for n in report.notes)
    # The soup does not depend on the pivot: it must equal the mean of the fine-tunes.
    out = merge([tmp_path / "ft0", tmp_path / "ft1"], tmp_path / "soup", optimizer="sgd", pivot=str(tmp_path / "base"),
                progress=False).path
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert_soup(out, BertForSequenceClassification, fts)
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "ft0"), str(tmp_path / "ft1"), "--pivot", str(tmp_path / "base"),
                 "--out", str(tmp_path / "adam"), "--quiet"]) == 0
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "adam")
    assert merged.classifier.weight.shape == (3, 16)
