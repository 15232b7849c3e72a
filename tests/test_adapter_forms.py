"""Adapters whose form is not the plain LoRA of tests/test_adapters.py (issue 21 items 2, 4, 6), each built with peft
and either merged exactly as peft merges it (`PeftModel.from_pretrained(base, adapter).merge_and_unload()`; a soup of
two adapters is the float64 mean of those models within 1e-6) or refused by `check` in one line naming the adapter,
the feature and what to do, before any weight is downloaded."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import ame_hf.plan as plan
from ame_hf import check, merge
from factories import build_base, make_finetunes, run_cli, tiny_tokenizer, weights_sha256


def make_adapter(base: Path, out: Path, seed: int, loader: Any = AutoModelForCausalLM, *, resize: int | None = None,
                 initial: Path | None = None, **options: Any) -> Path:
    """A LoRA adapter saved by peft from the model in `base` (resized to `resize` rows first), every trainable tensor
    moved by seeded noise. With `initial`, it is saved a second time converted (`out`-converted) against the initial
    adapter peft needs for that (PiSSA, OLoRA)."""
    model = loader.from_pretrained(base)
    if resize:
        model.resize_token_embeddings(resize)
    peft_model = get_peft_model(model, LoraConfig(**{"r": 2, "lora_alpha": 4, **options}))
    if initial is not None:  # peft's recipe: the initial adapter, saved as a plain LoRA one
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(initial)
        peft_model.peft_config["default"].init_lora_weights = options["init_lora_weights"]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in peft_model.parameters() if p.requires_grad):
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(out)
    if initial is not None:
        peft_model.save_pretrained(out.with_name(out.name + "-converted"),
                                   path_initial_model_for_weight_conversion=str(initial))
    return out


def peft_model_of(base: Path, adapter: Path, loader: Any = AutoModelForCausalLM,
                  resize: int | None = None) -> dict[str, torch.Tensor]:
    """What peft loads: the adapter on its base (resized first, as peft needs for a resized vocabulary), merged."""
    model = loader.from_pretrained(base)
    if resize:
        model.resize_token_embeddings(resize)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def assert_mean(out: Path, references: list[dict[str, torch.Tensor]], loader: Any = AutoModelForCausalLM) -> None:
    """The output, loaded as its users load it, is the float64 mean of the references within 1e-6."""
    merged = loader.from_pretrained(out).state_dict()
    assert set(merged) == set(references[0])
    for name, value in merged.items():
        expected = sum(r[name].double() for r in references) / len(references)
        assert torch.allclose(value.double(), expected, atol=1e-6), name


def assert_refused(capsys: Any, refs: list[Path], *needles: str) -> str:
    """`check` refuses in one report line naming the first ref and every needle; `ame-hf check` exits 1 with it."""
    report = check(refs)
    assert not report.ok and len(report.errors) == 1, report.errors
    line = report.errors[0]
    assert "\n" not in line and str(refs[0]) in line, line
    for needle in needles:
        assert needle in line, line
    code, out, _ = run_cli(capsys, "check", *refs)
    assert code == 1 and f"error: {line}" in out, out
    return line


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama base, a plain LoRA adapter of it, and a folder to write variants of it into."""
    root = tmp_path_factory.mktemp("forms")
    build_base("llama").save_pretrained(root / "base")
    make_adapter(root / "base", root / "plain", 0, target_modules=["q_proj", "up_proj"])
    return {"root": root, "base": root / "base", "plain": root / "plain"}


# -- adapter_config.json: every key is one peft knows, and does what ame-hf computes ----------------------------------

def test_every_field_of_peft_lora_config_is_classified():
    """The fields of the installed peft's `LoraConfig` are each known to have no effect on the merge, computed, or
    refused when set; only LoRA variants (peft's own `is_lora_variant` mark) are left to the general refusal."""
    import peft

    from ame_hf._adapter_config import _COMPUTED, _NO_EFFECT, _REFUSED

    fields = dataclasses.fields(peft.LoraConfig)
    known = _NO_EFFECT | _COMPUTED | set(_REFUSED) | {"alora_invocation_tokens"}
    left = {f.name for f in fields if f.name not in known}
    assert all(f.metadata.get("is_lora_variant") for f in fields if f.name in left), left
    assert {"use_dora", "init_lora_weights", "target_parameters", "lora_bias"} <= {f.name for f in fields}


REFUSED_CONFIGS = [
    ({"use_dora": True}, ("DoRA", "merge_and_unload")),
    ({"use_qalora": True}, ("QA-LoRA", "merge_and_unload")),
    ({"peft_type": "IA3"}, ("IA3", "merge_and_unload")),
    ({"alora_invocation_tokens": [3, 4]}, ("aLoRA", "peft refuses to merge it", "unmerged")),
    ({"init_lora_weights": "pissa"}, ("PiSSA", "path_initial_model_for_weight_conversion")),
    ({"init_lora_weights": "pissa_niter_4"}, ("PiSSA", "path_initial_model_for_weight_conversion")),
    ({"init_lora_weights": "olora"}, ("OLoRA", "path_initial_model_for_weight_conversion")),
    ({"init_lora_weights": "corda"}, ("CorDA", "path_initial_model_for_weight_conversion")),
    ({"init_lora_weights": "lora_ga"}, ("LoRA-GA", "path_initial_model_for_weight_conversion")),
    ({"init_lora_weights": "loftq"}, ("LoftQ", "merge_and_unload")),
    ({"trainable_token_indices": [1, 2]}, ("trainable_token_indices", "merge_and_unload")),
    ({"layer_replication": [[0, 2], [1, 2]]}, ("layer_replication", "merge_and_unload")),
    ({"megatron_config": {"tensor_model_parallel_size": 2}}, ("megatron_config", "merge_and_unload")),
    ({"kasa_config": {"beta": 1e-4}}, ("kasa_config", "LoRA variant", "merge_and_unload")),
    ({"bias": "some"}, ("bias='some'", "merge_and_unload")),
    ({"shiny_new_option": 1}, ("unknown adapter_config.json key 'shiny_new_option'", "does not know it either")),
]


@pytest.mark.parametrize("edit,needles", REFUSED_CONFIGS, ids=[next(iter(e)) + "=" + str(next(iter(e.values())))
                                                               for e, _ in REFUSED_CONFIGS])
def test_adapter_config_keys_that_change_the_merge_are_refused_by_name(llama, tmp_path, capsys, edit, needles):
    adapter = tmp_path / "edited"
    shutil.copytree(llama["plain"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    assert_refused(capsys, [adapter, llama["plain"]], *needles)


def test_initializations_merge_as_peft_loads_them(llama, capsys):
    """PiSSA and OLoRA saved as trained are factors over a base peft changes on load: refused, naming peft's
    conversion; converted, they are plain LoRA and merge exactly, as do the inits that leave the base alone (MiCA,
    Gaussian). An aLoRA adapter is refused: peft cannot merge it either."""
    root, base = llama["root"], llama["base"]
    targets = dict(target_modules=["q_proj", "up_proj"])
    pissa = make_adapter(base, root / "pissa", 1, init_lora_weights="pissa", initial=root / "pissa-init", **targets)
    olora = make_adapter(base, root / "olora", 2, init_lora_weights="olora", initial=root / "olora-init", **targets)
    assert_refused(capsys, [pissa, llama["plain"]], "PiSSA", "path_initial_model_for_weight_conversion")
    assert_refused(capsys, [olora, llama["plain"]], "OLoRA", "path_initial_model_for_weight_conversion")
    alora = make_adapter(base, root / "alora", 3, alora_invocation_tokens=[3, 4], task_type="CAUSAL_LM", **targets)
    with pytest.raises(NotImplementedError):  # why it is refused: peft itself cannot merge it
        peft_model_of(base, alora)
    assert_refused(capsys, [alora, llama["plain"]], "aLoRA")
    adapters = [root / "pissa-converted", root / "olora-converted",
                make_adapter(base, root / "mica", 4, init_lora_weights="mica", **targets),
                make_adapter(base, root / "gaussian", 5, init_lora_weights="gaussian", **targets)]
    assert json.loads((adapters[0] / "adapter_config.json").read_text())["init_lora_weights"] is True
    out = merge(adapters, root / "inits-soup", optimizer="sgd", progress=False).path
    assert_mean(out, [peft_model_of(base, a) for a in adapters])


def test_lora_biases_merge_as_peft_merges_them(tmp_path):
    """`bias="all"` / `"lora_only"` store trained biases, `lora_bias` a bias of B: each merged as peft merges it."""
    base = tmp_path / "base"
    build_base("llama", attention_bias=True, mlp_bias=True).save_pretrained(base)
    targets = dict(target_modules=["q_proj", "up_proj"])
    adapters = [make_adapter(base, tmp_path / "all", 0, bias="all", **targets),
                make_adapter(base, tmp_path / "lora-only", 1, bias="lora_only", **targets),
                make_adapter(base, tmp_path / "lora-bias", 2, lora_bias=True, **targets)]
    out = merge(adapters, tmp_path / "soup", optimizer="sgd", progress=False).path
    assert_mean(out, [peft_model_of(base, a) for a in adapters])


def test_fan_in_fan_out_follows_the_module_class_not_the_config(tmp_path):
    """peft transposes the delta of transformers' Conv1D and never that of a Linear, whatever `fan_in_fan_out` says
    (it warns and overrides it): a GPT-2 adapter whose config says False, a llama one whose config says True."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=24, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path / "gpt2")
    build_base("llama").save_pretrained(tmp_path / "llama")
    for kind, targets, saying in (("gpt2", ["c_attn", "c_proj"], False), ("llama", ["q_proj", "up_proj"], True)):
        base = tmp_path / kind
        adapters = [make_adapter(base, tmp_path / f"{kind}-{i}", i, target_modules=targets) for i in range(2)]
        for adapter in adapters:  # c_proj of the attention is square: its shapes cannot tell
            config = json.loads((adapter / "adapter_config.json").read_text())
            (adapter / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": saying}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's own "Setting fan_in_fan_out to ..."
            references = [peft_model_of(base, a) for a in adapters]
        out = merge(adapters, tmp_path / f"{kind}-soup", optimizer="sgd", progress=False).path
        assert_mean(out, references)


# -- LoRA on convolutions ---------------------------------------------------------------------------------------------

def test_lora_on_convolutions_equals_peft_in_any_block_size(tmp_path, monkeypatch):
    """A ViT patch embedding (Conv2d, kernel 4x4) and Whisper's encoder convolutions (Conv1d, kernel 3): peft's conv
    delta (A a conv of the kernel, B a 1x1 conv), the same bytes whole and in blocks of 100 elements."""
    from transformers import (ViTConfig, ViTForImageClassification, WhisperConfig,
                              WhisperForConditionalGeneration)

    torch.manual_seed(0)
    models = {
        "vit": (ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3)),
                ["projection"]),
        "whisper": (WhisperForConditionalGeneration(WhisperConfig(
            vocab_size=32, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8,
            max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)),
            ["conv1", "conv2", "q_proj"]),
    }
    for kind, (model, targets) in models.items():
        loader, base = type(model), tmp_path / kind
        model.save_pretrained(base)
        adapters = [make_adapter(base, tmp_path / f"{kind}-{i}", i, loader, target_modules=targets) for i in range(2)]
        whole = merge(adapters, tmp_path / f"{kind}-whole", optimizer="sgd", progress=False).path
        assert_mean(whole, [peft_model_of(base, a, loader) for a in adapters], loader)
        monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 100)
        conv = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)))
        assert len(plan.row_blocks(tuple(conv.weight.shape))) > 1  # the conv delta is computed in several blocks
        sliced = merge(adapters, tmp_path / f"{kind}-sliced", optimizer="sgd", progress=False).path
        monkeypatch.undo()
        assert weights_sha256(whole) == weights_sha256(sliced), kind


def test_lora_on_a_grouped_convolution_is_refused(tmp_path, capsys):
    """peft cannot merge LoRA into a convolution with groups > 1 (ConvNeXt's depthwise conv): refused by `check`."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    base = tmp_path / "convnext"
    ConvNextForImageClassification(ConvNextConfig(num_stages=1, hidden_sizes=[8], depths=[1], num_labels=3,
                                                  image_size=16)).save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "dw", 0, ConvNextForImageClassification, target_modules=["dwconv"], r=8)
    with pytest.raises(NotImplementedError):  # why it is refused
        peft_model_of(base, adapter, ConvNextForImageClassification)
    assert_refused(capsys, [adapter, adapter], "dwconv", "grouped convolution", "unmerged")


# -- an adapter trained on a resized vocabulary ---------------------------------------------------------------------

RESIZED = {  # how the adapter was trained after `resize_token_embeddings`; every form stores every token row
    "embedding LoRA, lm_head saved": dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    "LoRA on both": dict(target_modules=["q_proj", "embed_tokens", "lm_head"]),
    "resized only": dict(target_modules=["q_proj"]),
    "tied, resized only": dict(target_modules=["q_proj"], tied=True),
}


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> dict[str, Any]:
    """Bases (untied and tied) whose embeddings have exactly their tokenizer's 15 rows, a full fine-tune of each, and
    the tokenizer with two added tokens the adapters were trained with."""
    root = tmp_path_factory.mktemp("resized")
    tokenizer = tiny_tokenizer()
    out: dict[str, Any] = {"root": root, "rows": len(tokenizer)}
    for tied in (False, True):
        base, full = root / f"base-{tied}", root / f"full-{tied}"
        build_base("llama", vocab_size=len(tokenizer), tie_word_embeddings=tied).save_pretrained(base)
        make_finetunes(root, n=1, vocab_size=len(tokenizer), tie_word_embeddings=tied, names=[f"full-{tied}"])
        for folder in (base, full):
            tokenizer.save_pretrained(folder)
        out[tied] = (base, full)
    added = AutoTokenizer.from_pretrained(out[False][0])
    added.add_tokens(["<x>", "<y>"])
    out["added"] = added
    return out


@pytest.mark.parametrize("form", list(RESIZED))
def test_an_adapter_of_a_resized_vocabulary_merges_over_its_own_vocabulary(vocab, form):
    """The adapter's model is peft's on a resized base: 17 rows, its own tokenizer. Merged with a full fine-tune of
    the 15-token base, in either order, the output is the vocabulary-matched mean: the 15 shared rows averaged, the
    2 new ones the adapter's; its tokenizer encodes every token to its row."""
    options = dict(RESIZED[form])
    tied = options.pop("tied", False)
    base, full = vocab[tied]
    rows = len(vocab["added"])
    adapter = make_adapter(base, vocab["root"] / f"{form}-{tied}", 0, resize=rows, **options)
    vocab["added"].save_pretrained(adapter)
    reference = peft_model_of(base, adapter, resize=rows)
    fine_tune = AutoModelForCausalLM.from_pretrained(full).state_dict()
    token_indexed = {"model.embed_tokens.weight", "lm_head.weight"}
    expected = {}
    for name, value in reference.items():
        mean = value.double().clone()
        shared = slice(0, vocab["rows"]) if name in token_indexed else slice(None)
        mean[shared] = (value[shared].double() + fine_tune[name].double()) / 2
        expected[name] = mean
    for order in ([adapter, full], [full, adapter]):
        report = check(order)
        assert report.ok, report.errors
        assert any(f"vocabulary resized to {rows} rows" in n for n in report.notes), report.notes
        out = merge(order, vocab["root"] / f"out-{form}-{tied}-{order[0].name}", optimizer="sgd", progress=False).path
        model = AutoModelForCausalLM.from_pretrained(out)
        merged = model.state_dict()
        assert set(merged) == set(expected) and model.config.vocab_size == rows
        for name, value in merged.items():
            assert torch.allclose(value.double(), expected[name], atol=1e-6), (name, order)
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert len(tokenizer) == rows
        assert tokenizer.convert_tokens_to_ids(["<x>", "<y>"]) == [rows - 2, rows - 1]


def test_a_resized_vocabulary_whose_new_output_rows_are_not_stored_is_refused(vocab, capsys):
    """Embedding LoRA after a resize, lm_head not saved: peft loads it on a resized base whose new lm_head rows are
    random, so no merge can equal it. Refused in either order (the output had 15 rows for 17 tokens, or the new
    tokens read as <unk>)."""
    base, full = vocab[False]
    rows = len(vocab["added"])
    adapter = make_adapter(base, vocab["root"] / "embedding-only", 0, resize=rows,
                           target_modules=["q_proj", "embed_tokens"])
    vocab["added"].save_pretrained(adapter)
    for order in ([adapter, full], [full, adapter]):
        report = check(order)
        assert not report.ok and len(report.errors) == 1, report.errors
        assert str(adapter) in report.errors[0] and "lm_head.weight" in report.errors[0], report.errors
        assert "modules_to_save" in report.errors[0] and "merge_and_unload" in report.errors[0], report.errors
    assert_refused(capsys, [adapter, full], "resized the vocabulary to 17 rows (the base has 15)")


def test_refusals_come_before_the_weights_are_downloaded(vocab, llama, hub, hub_token, tmp_path, capsys):
    """A Hub adapter refused by its config is refused before its own weights are fetched; one refused by its tensors
    (a resized vocabulary without lm_head) after fetching only its small adapter file: the base's weights never."""
    import os

    from huggingface_hub import HfApi

    api = HfApi(token=hub_token)
    base, _ = vocab[False]
    pissa = make_adapter(llama["base"], tmp_path / "pissa", 1, init_lora_weights="pissa",
                         target_modules=["q_proj"])
    embedding = make_adapter(base, tmp_path / "embedding", 0, resize=len(vocab["added"]),
                             target_modules=["q_proj", "embed_tokens"])
    vocab["added"].save_pretrained(embedding)
    for repo, folder, its_base in (("org/forms-pissa", pissa, "org/forms-base-llama"),
                                   ("org/forms-resized", embedding, "org/forms-base-vocab")):
        api.create_repo(its_base, exist_ok=True)
        api.upload_folder(repo_id=its_base, folder_path=llama["base"] if "llama" in its_base else base)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": its_base}))
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=folder)
    assert_refused(capsys, ["org/forms-pissa", "org/forms-pissa"], "PiSSA")
    assert_refused(capsys, ["org/forms-resized", "org/forms-resized"], "lm_head.weight")
    cache = Path(os.environ["HF_HOME"]) / "hub"
    fetched = {p.parent.parent.parent.name + "/" + p.name for p in cache.glob("models--org--forms-*/snapshots/*/*")}
    assert "models--org--forms-resized/adapter_model.safetensors" in fetched, fetched
    assert not {f for f in fetched if f.endswith(("model.safetensors", ".bin")) and "resized/adapter" not in f}, fetched
