"""Mixture-of-experts checkpoints in the two layouts transformers loads into one model: per-expert tensors (what
`save_pretrained` writes) and the fused 3-D expert tensors of the loaded model (`mlp.experts.gate_up_proj`), merged
as transformers loads each (issue 22, item 8); and LoRA adapters on fused experts (`target_parameters`), merged as
peft's `merge_and_unload` (item 3)."""

from __future__ import annotations

import json

import pytest
import torch

from ame_hf import AmeConfig, check, merge, plan
from factories import make_lora_adapter, peft_merged
from test_engine import reference_ame_states
from test_reconcile import perturbed


def tiny_moe(family: str, seed: int, tie: bool = False):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=32, num_experts_per_tok=2, tie_word_embeddings=tie)
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


# peft 0.21's `all-linear` on an MoE model adds the fused experts (and the router) as target_parameters, with a
# rank/alpha pattern; the explicit form names one expert tensor.
ADAPTERS = {
    "all-linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "down_proj": dict(r=3, lora_alpha=8, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"]),
    "rslora": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["v_proj"],
                   target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
}


@pytest.fixture(scope="module")
def moe_adapters(moe, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-adapters")
    adapters = {k: make_lora_adapter(moe["base"], root / k, options, seed=i + 1) for i, (k, options) in
                enumerate(ADAPTERS.items())}
    return adapters, {k: peft_merged(moe["base"], a, root / f"{k}-merged") for k, a in adapters.items()}


def test_target_parameters_adapters_merge_as_peft_merges_them(moe, moe_adapters, tmp_path):
    adapters, merged = moe_adapters
    refs = [adapters["all-linear"], adapters["down_proj"], adapters["rslora"]]
    config = json.loads((adapters["all-linear"] / "adapter_config.json").read_text())
    assert config["target_parameters"]  # what peft 0.21 writes for all-linear on an MoE model
    report = check(refs)
    assert report.ok, report.errors
    out = merge(refs, tmp_path / "soup", optimizer="sgd", progress=False).path
    states = [loaded(merged[k]) for k in ("all-linear", "down_proj", "rslora")]
    base = loaded(moe["base"])
    assert all(not torch.equal(s[k], base[k]) for s in states for k in base if k.endswith("experts.down_proj"))
    assert_close(out, {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}, atol=1e-5)
    assert saved_names(out) == saved_names(moe["split"])


def test_a_target_parameters_adapter_merges_with_a_fused_checkpoint_in_small_blocks(moe, moe_adapters, tmp_path,
                                                                                   monkeypatch):
    adapters, merged = moe_adapters
    refs = [adapters["down_proj"], moe["fused"]]
    whole = merge(refs, tmp_path / "whole", optimizer="sgd", progress=False).path
    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 24)
    small = merge(refs, tmp_path / "small", optimizer="sgd", progress=False).path
    assert (whole / "model.safetensors").read_bytes() == (small / "model.safetensors").read_bytes()
    states = [loaded(merged["down_proj"]), loaded(moe["fused"])]
    assert_close(small, {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}, atol=1e-5)


def test_an_adapter_on_a_fused_base_merges_as_peft_merges_it(moe, tmp_path):
    adapter = make_lora_adapter(moe["fused"], tmp_path / "on-fused", ADAPTERS["rslora"], seed=7)
    out = merge([adapter, moe["split"]], tmp_path / "soup", optimizer="sgd", progress=False).path
    states = [loaded(peft_merged(moe["fused"], adapter, tmp_path / "merged")), loaded(moe["split"])]
    assert_close(out, {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}, atol=1e-5)


def tiny_transposed_moe(family: str):
    """An MoE whose experts transformers keeps `[experts, in, out]` (`is_transposed`), saved whole as 3-D tensors:
    GPT-OSS (built unquantized) and Aria's text model (saved under its legacy `fc1`/`fc2` names)."""
    from transformers import AriaTextConfig, AriaTextForCausalLM, GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8)  # gate_up_proj [4, 16, 24]: its orientation shows
    if family == "gpt_oss":
        return GptOssForCausalLM(GptOssConfig(num_local_experts=4, num_experts_per_tok=2,
                                              layer_types=["full_attention"], **common))
    return AriaTextForCausalLM(AriaTextConfig(moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1, **common))


TRANSPOSED_ADAPTERS = {
    "down_proj": dict(r=3, lora_alpha=8, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"]),
    "rslora": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["v_proj"],
                   target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
}


@pytest.fixture(scope="module", params=["gpt_oss", "aria_text"])
def transposed(request, tmp_path_factory):
    """A base whose experts are stored `[in, out]`, two target_parameters adapters of it and peft's merges."""
    root = tmp_path_factory.mktemp(request.param)
    tiny_transposed_moe(request.param).save_pretrained(root / "base")
    adapters = {k: make_lora_adapter(root / "base", root / k, o, seed=i + 1)
                for i, (k, o) in enumerate(TRANSPOSED_ADAPTERS.items())}
    return root / "base", adapters, {k: peft_merged(root / "base", a, root / f"{k}-merged") for k, a in
                                     adapters.items()}


def test_adapters_on_experts_stored_in_out_merge_as_peft_merges_them(transposed, tmp_path, monkeypatch):
    """peft leaves such a parameter's features unswapped, and its delta per expert is `(B_e @ A_e).T`."""
    base, adapters, merged = transposed
    refs = list(adapters.values())
    report = check(refs)
    assert report.ok, report.errors
    assert any(f"{refs[0]} is a LoRA adapter (rank 3, alpha 8, targets " in n for n in report.notes), report.notes
    out = merge(refs, tmp_path / "soup", optimizer="sgd", progress=False).path
    states = [loaded(m) for m in merged.values()]
    before = loaded(base)
    experts = [k for k in before if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 2 and all(before[k].dim() == 3 for k in experts)
    assert all(not torch.equal(states[1][k], before[k]) for k in experts)  # peft really changed them
    assert_close(out, {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}, atol=1e-5)
    assert saved_names(out) == saved_names(base)  # the layout save_pretrained writes: 3-D experts, whole
    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 24)  # a block: less than one expert's matrix
    small = merge(refs, tmp_path / "small", optimizer="sgd", progress=False).path
    assert (out / "model.safetensors").read_bytes() == (small / "model.safetensors").read_bytes()


def test_adam_over_adapters_on_experts_stored_in_out_equals_the_whole_model_reference(transposed, tmp_path):
    base, adapters, merged = transposed
    config = AmeConfig(optimizer="adam", lr=0.01, epochs=2, pivot=str(base))
    out = merge(list(adapters.values()), tmp_path / "adam", config, progress=False).path
    expected = reference_ame_states([loaded(m) for m in merged.values()], config, loaded(base))
    assert_close(out, expected, atol=1e-5)


@pytest.mark.parametrize("other", ["bare", "fused"])
def test_moe_layouts_reconcile_under_the_per_expert_names(moe, tmp_path, other):
    """Layouts are reconciled under the per-expert names: a head tied in one ingredient and trained in the other, a
    bare model (no head, no base-model prefix) next to the causal LM."""
    family = json.loads((moe["base"] / "config.json").read_text())["model_type"]
    tied = perturbed(tiny_moe(family, 0, tie=True), 5, 0.05)
    tied.save_pretrained(tmp_path / "tied")
    if other == "bare":
        perturbed(tiny_moe(family, 0, tie=True), 6, 0.05).model.save_pretrained(tmp_path / "bare")
    refs = [tmp_path / "tied", tmp_path / "bare" if other == "bare" else moe[other]]
    report = check(refs)
    assert report.ok, report.errors
    out = merge(refs, tmp_path / "soup", optimizer="sgd", progress=False).path
    states = [loaded(r) for r in refs]
    assert_close(out, {k: sum(s[k].double() for s in states) / len(states) for k in states[0]})
    assert saved_names(out) - {"lm_head.weight"} == saved_names(moe["split"]) - {"lm_head.weight"}


def test_split_fused_and_adapter_ingredients_are_bit_identical_over_two_processes(moe, moe_adapters, tmp_path):
    import os
    import subprocess
    import sys

    from ame_hf.cli import main
    from factories import weights_sha256

    refs = [moe["fused"], moe["split"], moe_adapters[0]["all-linear"]]
    common = ["--relative-lr", "0.1", "--shuffle", "--epochs", "2", "--max-shard-size", "8KB", "--device", "cpu",
              "--quiet", "--base", str(moe["base"])]
    assert main(["merge", *map(str, refs), "--out", str(tmp_path / "one"), *common]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ame_hf",
           "merge", *map(str, refs), "--out", str(tmp_path / "two"), *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = weights_sha256(tmp_path / "one"), weights_sha256(tmp_path / "two")
    assert len(one) > 2 and one == two


def test_fused_and_split_hub_repos_check_from_headers_and_merge_as_local_folders(moe, hub, hub_token, tmp_path):
    from huggingface_hub import HfApi
    from safetensors.torch import load_file

    api = HfApi(token=hub_token)
    family = json.loads((moe["base"] / "config.json").read_text())["model_type"]
    repos = []
    for kind in ("fused", "split"):
        repo = f"org/moe-{family}-{kind}"
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=moe[kind])
        repos.append(repo)
    report = check(repos)
    assert report.ok, report.errors
    out = merge(repos, tmp_path / "hub", optimizer="sgd", progress=False).path
    local = merge([moe["fused"], moe["split"]], tmp_path / "local", optimizer="sgd", progress=False).path
    merged, expected = load_file(out / "model.safetensors"), load_file(local / "model.safetensors")
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_target_parameters_on_plain_2d_weights_merge_as_peft_merges_them(tmp_path):
    from factories import build_base

    build_base("llama").save_pretrained(tmp_path / "base")
    options = dict(r=2, lora_alpha=4, target_modules=["v_proj"],
                   target_parameters=["self_attn.q_proj.weight", "mlp.down_proj.weight"])
    adapters = [make_lora_adapter(tmp_path / "base", tmp_path / f"a{i}", options, seed=i + 1) for i in range(2)]
    states = [loaded(peft_merged(tmp_path / "base", a, tmp_path / f"m{i}")) for i, a in enumerate(adapters)]
    base = loaded(tmp_path / "base")
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(states[0][down], base[down])
    out = merge(adapters, tmp_path / "soup", optimizer="sgd", progress=False).path
    assert_close(out, {k: sum(s[k].double() for s in states) / len(states) for k in states[0]})


@pytest.mark.parametrize("transposed", [False, True])
def test_every_saved_piece_of_an_expert_parameter_gets_peft_s_own_delta(transposed):
    """Whichever piece of a fused expert parameter a checkpoint saves (rows of one expert's matrix, or whole experts)
    and whichever rows a block holds, the delta is the slice of peft's `ParamWrapper.get_delta_weight`, for experts
    kept [out, in] and for `is_transposed` ones kept [in, out]."""
    import peft
    from torch import nn

    from ame_hf._lora_delta import Lora, lora_delta
    from ame_hf._param_lora import _expert_factors, _piece, _Wrapper

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.is_transposed = transposed  # what transformers' experts say, and peft reads
            self.down_proj = nn.Parameter(torch.zeros(3, 5, 7))

    model = nn.Module()
    model.experts = Experts()
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=["experts.down_proj"])
    peft.inject_adapter_in_model(config, model)
    wrapper = model.experts
    torch.manual_seed(0)
    with torch.no_grad():
        for p in (wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight):
            p.normal_()
    expected = wrapper.get_delta_weight("default").double()  # [3, 5, 7]
    assert wrapper._did_swap_in_out_features is not transposed
    spec = _Wrapper(parameter="experts.down_proj", rank=2, scaling=3.0, out_first=not transposed, shape=(3, 5, 7))
    a_e, b_e = _expert_factors(wrapper.lora_A["default"].weight.detach(), wrapper.lora_B["default"].weight.detach(),
                               spec)
    for offset, shape, want in [(0, (3, 5, 7), expected), (35, (2, 5, 7), expected[1:]), (35 * 2 + 7, (3, 7),
                                expected[2, 1:4]), (0, (5, 7), expected[0])]:
        lora = Lora(**_piece(a_e, b_e, spec, offset, shape))
        assert torch.allclose(lora_delta(lora, None).double(), want, atol=1e-6), (offset, shape)
        assert torch.equal(lora_delta(lora, (1, 2)), lora_delta(lora, None)[1:2])  # a block: the same bytes
    assert _piece(a_e, b_e, spec, 3, (5, 7)) is None  # not rows of one expert
