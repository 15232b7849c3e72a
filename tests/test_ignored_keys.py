"""Keys transformers ignores on load (issue 22 item 7): old Llama checkpoints with per-layer `rotary_emb.inv_freq`,
old GPT-2 with `attn.bias` / `attn.masked_bias`. They are dropped as transformers drops them (a note), whether every
ingredient stores them or only some, and the output loads with no unexpected key and equals the float64 mean."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from ame_hf import check
from ame_hf.cli import main
from factories import make_finetunes


def _add(path, extra):
    file = path / "model.safetensors"
    state = load_file(file)
    state.update(extra)
    save_file(state, file, metadata={"format": "pt"})


def _llama(root, n):
    paths = make_finetunes(root, n=2)
    for p in paths[:n]:
        _add(p, {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.arange(4.0) for i in range(2)})
    return paths


def gpt2_with_ignored_keys(root, n):
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
        model.save_pretrained(root / f"g{i}")
        paths.append(root / f"g{i}")
    for p in paths[:n]:
        _add(p, {**{f"transformer.h.{j}.attn.masked_bias": torch.tensor(-1e4) for j in range(2)},
                 **{f"transformer.h.{j}.attn.bias": torch.ones(1, 1, 32, 32) for j in range(2)}})
    return paths


def _loaded(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return {k: v.detach().double() for k, v in model.state_dict().items()}, info


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("holders", [2, 1])  # every ingredient stores the ignored keys, or only the first
def test_keys_ignored_on_load_are_dropped_as_transformers_drops_them(tmp_path, family, holders):
    paths = (_llama if family == "llama" else gpt2_with_ignored_keys)(tmp_path / "in", holders)
    report = check(paths)
    assert report.ok, report.errors
    assert any("is not used" in n and ("inv_freq" in n or "masked_bias" in n) for n in report.notes), report.notes
    out = tmp_path / "out"
    assert main(["merge", *map(str, paths), "--out", str(out), "--quiet", "--optimizer", "sgd"]) == 0
    merged, info = _loaded(out)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    assert not [k for k in load_file(out / "model.safetensors") if "inv_freq" in k or k.endswith((".masked_bias",
                                                                                                  ".attn.bias"))]
    states = [_loaded(p)[0] for p in paths]
    for name, value in merged.items():
        expected = sum(s[name] for s in states) / len(states)
        assert torch.allclose(value, expected, atol=1e-6), name


def test_a_legacy_weight_name_transformers_renames_is_not_dropped(tmp_path):
    """`LayerNorm.gamma` is a tensor of a module the class has, under a name it lacks, like a stale buffer; but it is
    a trained weight transformers' conversion mapping loads as `LayerNorm.weight`: it is never dropped."""
    from transformers import AutoModelForSequenceClassification

    paths = make_finetunes(tmp_path / "in", n=2, kind="bert")
    for p in paths:
        file = p / "model.safetensors"
        state = load_file(file)
        state = {k.replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in state.items()}
        save_file(state, file, metadata={"format": "pt"})
    report = check(paths)
    assert report.ok and not any("gamma" in n and "not used" in n for n in report.notes), report.notes
    out = tmp_path / "out"
    assert main(["merge", *map(str, paths), "--out", str(out), "--quiet", "--optimizer", "sgd"]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    states = [AutoModelForSequenceClassification.from_pretrained(p).state_dict() for p in paths]
    for name, value in merged.items():
        assert torch.allclose(value.double(), sum(s[name].double() for s in states) / 2, atol=1e-6), name
