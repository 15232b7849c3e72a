"""PEFT LoRA adapters as ingredients (ame_hf/adapters.py), checked against peft itself: the soup of two
adapters and a full fine-tune equals the mean of their `merge_and_unload()` models, and Adam AME equals the
whole-model reference run on those merged models."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from ame_hf import AmeConfig, check, merge
from ame_hf.cli import main
from factories import build_base, make_finetunes, make_lora_adapter, peft_merged
from test_engine import reference_ame

LORAS = [
    # plain LoRA with per-module rank/alpha, embedding LoRA and modules_to_save
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"],
         rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3}),
    # rsLoRA on the MLP
    dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["up_proj", "down_proj", "k_proj"]),
]


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = root / "base"
    build_base("llama").save_pretrained(base)
    adapters = [make_lora_adapter(base, root / f"lora{i}", options, seed=i) for i, options in enumerate(LORAS)]
    full = make_finetunes(root / "full", n=1)[0]  # a full fine-tune of the same base
    references = [peft_merged(base, a, root / f"peft{i}") for i, a in enumerate(adapters)]
    return {"base": base, "adapters": adapters, "full": full, "references": [*references, full]}


def test_soup_of_adapters_and_a_full_finetune_is_the_mean_of_peft_merges(mix, tmp_path):
    out = merge([*mix["adapters"], mix["full"]], tmp_path / "soup", optimizer="sgd", progress=False).path
    merged = load_file(out / "model.safetensors")
    states = [load_file(r / "model.safetensors") for r in mix["references"]]
    assert set(merged) == set(states[0])
    for name, value in merged.items():
        expected = sum(s[name].double() for s in states) / len(states)
        assert torch.allclose(value.double(), expected, atol=1e-6), name


def test_adam_ame_on_adapters_equals_the_whole_model_reference(mix, tmp_path):
    config = AmeConfig(optimizer="adam", lr=1e-3, epochs=2)
    out = merge([*mix["adapters"], mix["full"]], tmp_path / "adam", config, progress=False).path
    expected = reference_ame(mix["references"], config.resolved())
    merged = load_file(out / "model.safetensors")
    for name, value in expected.items():
        assert torch.allclose(merged[name].double(), value.double(), atol=1e-6), name


def test_pivot_base_starts_from_the_adapters_base(mix, tmp_path):
    config = AmeConfig(optimizer="adam", lr=1e-3, pivot="base")
    out = merge(mix["adapters"], tmp_path / "from-base", config, progress=False).path
    expected = reference_ame(mix["references"][:2], config.resolved(), pivot_path=mix["base"])
    merged = load_file(out / "model.safetensors")
    for name, value in expected.items():
        assert torch.allclose(merged[name].double(), value.double(), atol=1e-6), name
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not (out / "adapter_config.json").exists()  # a full model with the base's config
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "README.md").data.library_name == "transformers"


def test_hub_adapters_merge_by_repo_id_and_the_card_names_base_and_adapters(mix, hub, hub_token, tmp_path):
    from huggingface_hub import HfApi, ModelCard

    api = HfApi(token=hub_token)
    api.create_repo("org/lora-base", exist_ok=True)
    api.upload_folder(repo_id="org/lora-base", folder_path=mix["base"])
    repos = []
    for i, adapter in enumerate(mix["adapters"]):
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "org/lora-base"
        folder = tmp_path / f"up{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
        api.create_repo(f"org/lora-{i}", exist_ok=True)
        api.upload_folder(repo_id=f"org/lora-{i}", folder_path=folder)
        repos.append(f"org/lora-{i}")
    out = merge(repos, tmp_path / "hub-soup", optimizer="sgd", progress=False).path
    local = merge(mix["adapters"], tmp_path / "local-soup", optimizer="sgd", progress=False).path
    assert load_file(out / "model.safetensors").keys() == load_file(local / "model.safetensors").keys()
    for name, value in load_file(out / "model.safetensors").items():
        assert torch.equal(value, load_file(local / "model.safetensors")[name]), name
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [*repos, "org/lora-base"]
    # the ingredient table says which ingredients are LoRA adapters, and of which base (issue 23 item 10)
    rows = [line for line in card.text.split("## Ingredients")[1].splitlines() if line.startswith("| 0 ")
            or line.startswith("| 1 ")]
    assert len(rows) == 2 and all("LoRA adapter (rank" in r and "of org/lora-base" in r for r in rows), rows


def test_check_reports_adapters_as_such(mix, capsys):
    report = check([*mix["adapters"], mix["full"]])
    assert report.ok, report.errors
    note = next(n for n in report.notes if "is a LoRA adapter" in n)
    assert "rank 2/4" in note and "q_proj" in note and "modules_to_save ['lm_head']" in note, note
    capsys.readouterr()
    assert main(["check", *map(str, mix["adapters"])]) == 0
    assert "rsLoRA" in capsys.readouterr().out


def test_adapters_of_different_bases_are_refused_in_one_line(mix, tmp_path, capsys):
    other = tmp_path / "other-base"
    build_base("llama", seed=7).save_pretrained(other)
    stray = make_lora_adapter(other, tmp_path / "stray", LORAS[1], seed=9)
    capsys.readouterr()
    assert main(["merge", str(mix["adapters"][0]), str(stray), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different base models" in err and "--base" in err, err
    # --base names one base for all: then the (perturbed) adapter applies to it
    assert main(["merge", str(mix["adapters"][0]), str(stray), "--base", str(mix["base"]), "--out",
                 str(tmp_path / "o"), "--quiet", "--optimizer", "sgd"]) == 0


def test_fan_in_fan_out_adapters_of_gpt2_equal_peft(tmp_path):
    """GPT-2 keeps its weights transposed (Conv1D): PEFT's fan_in_fan_out transposes the delta too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=24, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    adapters, references = [], []
    for i in range(2):
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                               LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in (p for p in model.parameters() if p.requires_grad):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        model.save_pretrained(tmp_path / f"ad{i}")
        references.append(model.merge_and_unload().state_dict())
        adapters.append(tmp_path / f"ad{i}")
    out = merge(adapters, tmp_path / "soup", optimizer="sgd", base=str(tmp_path / "base"), progress=False).path
    merged = GPT2LMHeadModel.from_pretrained(out).state_dict()
    for name, value in merged.items():
        if name in references[0] and value.is_floating_point():
            expected = (references[0][name].double() + references[1][name].double()) / 2
            assert torch.allclose(value.double(), expected, atol=1e-6), name
