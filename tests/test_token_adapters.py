"""Adapters that carry token rows (issue 22 item 4): peft's TrainableTokens (`trainable_token_indices`, a list or a
dict by module), with and without a resized vocabulary, on untied and tied models. Each merges as peft merges it:
a soup of two such adapters is the float64 mean of their `merge_and_unload()` models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ame_hf import check, merge
import ame_hf.plan as plan
from factories import build_base, tiny_tokenizer, weights_sha256
from test_adapter_forms import make_adapter, peft_model_of


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    tokenizer = tiny_tokenizer()
    out = {"root": root}
    for tied in (False, True):
        build_base("llama", vocab_size=len(tokenizer), tie_word_embeddings=tied).save_pretrained(root / f"base-{tied}")
        tokenizer.save_pretrained(root / f"base-{tied}")
        out[tied] = root / f"base-{tied}"
    added = AutoTokenizer.from_pretrained(out[False])
    added.add_tokens(["<x>", "<y>"])
    out["added"] = added
    return out


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("resize", [False, True])
@pytest.mark.parametrize("spec", ["list", "dict"])
def test_trainable_tokens_merge_as_peft_merges_them(bases, tied, resize, spec):
    rows = len(bases["added"]) if resize else None
    indices = [3, 5] + ([15, 16] if resize else [])
    option = indices if spec == "list" else {"embed_tokens": indices}
    adapters, references = [], []
    for seed in (0, 1):
        path = bases["root"] / f"a-{tied}-{resize}-{spec}-{seed}"
        make_adapter(bases[tied], path, seed, resize=rows, target_modules=["q_proj"], trainable_token_indices=option)
        if resize:
            bases["added"].save_pretrained(path)
        adapters.append(path)
        references.append(peft_model_of(bases[tied], path, resize=rows))
    report = check(adapters)
    assert report.ok, report.errors
    out = merge(adapters, bases["root"] / f"out-{tied}-{resize}-{spec}", optimizer="sgd", progress=False).path
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    merged = model.state_dict()
    assert set(merged) == set(references[0])
    for name, value in merged.items():
        expected = sum(r[name].double() for r in references) / len(references)
        assert torch.allclose(value.double(), expected, atol=1e-6), name
    # the trained rows are the adapters' own (their mean), not the base's
    embed = "model.embed_tokens.weight"
    base_rows = AutoModelForCausalLM.from_pretrained(bases[tied]).state_dict()[embed][3]
    assert not torch.allclose(merged[embed][3], base_rows)


def test_trainable_tokens_in_small_blocks_and_beside_a_full_fine_tune(bases, monkeypatch, tmp_path):
    """Row blocks that cut through the trained rows give the same bytes; beside a full fine-tune of the base (either
    order) each tensor is the mean of the adapter's peft model and the fine-tune."""
    from factories import make_finetunes

    adapter = make_adapter(bases[False], tmp_path / "a", 0, target_modules=["q_proj"], trainable_token_indices=[3, 5])
    full = make_finetunes(tmp_path, n=1, vocab_size=len(tiny_tokenizer()), names=["full"])[0]
    tiny_tokenizer().save_pretrained(full)
    references = [peft_model_of(bases[False], adapter), AutoModelForCausalLM.from_pretrained(full).state_dict()]
    outs = []
    for i, (order, block) in enumerate([([adapter, full], None), ([adapter, full], 32), ([full, adapter], None)]):
        monkeypatch.undo()
        if block:
            monkeypatch.setattr(plan, "BLOCK_ELEMENTS", block)
            assert len(plan.row_blocks((len(tiny_tokenizer()), 16))) > 1  # the token rows cut into blocks
        outs.append(merge(order, tmp_path / f"out{i}", optimizer="sgd", progress=False).path)
    monkeypatch.undo()
    assert weights_sha256(outs[0]) == weights_sha256(outs[1])
    for out in (outs[0], outs[2]):
        merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
        for name, value in merged.items():
            expected = sum(r[name].double() for r in references) / 2
            assert torch.allclose(value.double(), expected, atol=1e-6), name
