"""Mixture-of-experts checkpoints in the two layouts transformers loads into one model: per-expert tensors (what
`save_pretrained` writes) and the fused 3-D expert tensors of the loaded model (`mlp.experts.gate_up_proj`), merged
as transformers loads each (issue 22, item 8); and LoRA adapters on fused experts (`target_parameters`), refused by
name (item 3)."""

from __future__ import annotations

import json

import pytest
import torch

from ame_hf import AmeConfig, check, merge
from ame_hf import plan
from test_engine import reference_ame_states
from test_reconcile import perturbed


def tiny_moe(family: str, seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=32, num_experts_per_tok=2, tie_word_embeddings=False)
    if family == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=8, num_experts=4,
                                                  head_dim=8, **common))
    return MixtralForCausalLM(MixtralConfig(intermediate_size=8, num_local_experts=4, **common))


def save_fused(model, folder) -> None:
    """The model as it is loaded (fused 3-D expert tensors), not as `save_pretrained` writes it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})


def loaded(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.state_dict()


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe(request, tmp_path_factory):
    """{name: folder}: a base and two fine-tunes saved per expert, one fine-tune saved fused."""
    root = tmp_path_factory.mktemp(request.param)
    folders = {n: root / n for n in ("base", "split", "split2", "fused")}
    tiny_moe(request.param, 0).save_pretrained(folders["base"])
    perturbed(tiny_moe(request.param, 0), 1, 0.05).save_pretrained(folders["split"])
    perturbed(tiny_moe(request.param, 0), 2, 0.05).save_pretrained(folders["split2"])
    save_fused(perturbed(tiny_moe(request.param, 0), 3, 0.05), folders["fused"])
    return folders


def saved_names(folder) -> set[str]:
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def assert_close(out, expected, atol=1e-6):
    merged = loaded(out)
    assert set(merged) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(merged[name].double(), value.double(), atol=atol), name


@pytest.mark.parametrize("order", [["split", "fused"], ["fused", "split", "split2"]])
def test_the_soup_of_split_and_fused_experts_is_the_mean_of_the_loaded_models(moe, tmp_path, order):
    refs = [moe[o] for o in order]
    assert saved_names(moe["fused"]) != saved_names(moe["split"])  # the two layouts really differ on disk
    report = check(refs)
    assert report.ok, report.errors
    out = merge(refs, tmp_path / "soup", optimizer="sgd", progress=False).path
    states = [loaded(r) for r in refs]
    assert_close(out, {k: sum(s[k].double() for s in states) / len(states) for k in states[0]})
    assert saved_names(out) == saved_names(moe["split"])  # the layout save_pretrained writes


def test_the_bytes_do_not_depend_on_the_block_size(moe, tmp_path, monkeypatch):
    refs = [moe["fused"], moe["split"]]
    whole = merge(refs, tmp_path / "whole", optimizer="sgd", progress=False).path
    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 24)
    small = merge(refs, tmp_path / "small", optimizer="sgd", progress=False).path
    assert (whole / "model.safetensors").read_bytes() == (small / "model.safetensors").read_bytes()


@pytest.mark.parametrize("pivot", ["mean", "base"])
def test_adam_over_split_and_fused_experts_equals_the_whole_model_reference(moe, tmp_path, pivot):
    refs = [moe["fused"], moe["split"]]
    config = AmeConfig(optimizer="adam", lr=0.01, epochs=2, pivot=str(moe["base"]) if pivot == "base" else pivot)
    out = merge(refs, tmp_path / "adam", config, progress=False).path
    expected = reference_ame_states([loaded(r) for r in refs], config,
                                    loaded(moe["base"]) if pivot == "base" else None)
    assert_close(out, expected)


def test_two_fused_checkpoints_merge_into_the_saved_layout(moe, tmp_path):
    twin = tmp_path / "fused2"
    save_fused(perturbed(tiny_moe(json.loads((moe["base"] / "config.json").read_text())["model_type"], 0), 4, 0.05),
               twin)
    refs = [moe["fused"], twin]
    out = merge(refs, tmp_path / "soup", optimizer="sgd", progress=False).path
    states = [loaded(r) for r in refs]
    assert_close(out, {k: sum(s[k].double() for s in states) / len(states) for k in states[0]})
    assert saved_names(out) == saved_names(moe["split"])


def test_a_fused_checkpoint_known_by_its_headers_checks_under_the_saved_names(moe):
    from ame_hf.checkpoint import Checkpoint, TensorInfo

    opened = Checkpoint(moe["fused"])
    stored = Checkpoint(moe["split"])
    headers = {k: TensorInfo(file="model.safetensors", shape=tuple(v.shape), dtype=v.dtype)
               for k, v in loaded(moe["fused"]).items()}  # the fused names, no byte offsets (as read from the Hub)
    ckpt = Checkpoint.from_header("org/fused", opened.config, headers)
    assert not getattr(ckpt, "refusals", None)
    assert {n: i.shape for n, i in ckpt.tensors.items()} == {n: i.shape for n, i in stored.tensors.items()}


def test_a_fused_bin_checkpoint_is_refused_by_name(moe, tmp_path):
    folder = tmp_path / "fused_bin"
    folder.mkdir()
    (folder / "config.json").write_text((moe["fused"] / "config.json").read_text())
    torch.save({k: v.clone() for k, v in loaded(moe["fused"]).items()}, folder / "pytorch_model.bin")
    report = check([moe["split"], folder])
    assert not report.ok
    assert any(f"{folder} stores tensors transformers converts on load" in e and "fused MoE experts" in e
               for e in report.errors), report.errors
