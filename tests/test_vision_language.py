"""Vision-language models (tiny LLaVA, Qwen2-VL and Gemma 3 built from their configs): a LoRA adapter, which peft
names as transformers v5 loads the model, merges over its base stored under the names `save_pretrained` writes
(transformers' conversion mapping relates the two), equal to peft's `merge_and_unload()`; fine-tunes that added
tokens, whose vocabulary size lives in the nested text config, merge by token like a text model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import ame_hf.plan as plan
from ame_hf import AmeConfig, merge
from ame_hf.cli import main
from factories import perturb, tiny_tokenizer, weights_sha256
from test_engine import reference_ame_states

TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=32, tie_word_embeddings=False)
# a CLIP / SigLIP vision tower of one layer
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
              patch_size=4)


def build_vlm(family: str, vocab_size: int = 64, seed: int = 0) -> transformers.PreTrainedModel:
    """A freshly initialised tiny vision-language model; its last token ids are the image (and video) tokens."""
    torch.manual_seed(seed)
    last = vocab_size - 1
    text = {**TEXT, "vocab_size": vocab_size}
    if family == "llava":
        config = transformers.LlavaConfig(text_config={"model_type": "llama", **text}, image_token_index=last,
                                          vision_config={"model_type": "clip_vision_model", **VISION})
        return transformers.LlavaForConditionalGeneration(config)
    if family == "qwen2_vl":
        config = transformers.Qwen2VLConfig(
            text_config={"model_type": "qwen2_vl_text", **text, "bos_token_id": 0, "eos_token_id": 0,
                         "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
            vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=2,
                               temporal_patch_size=1, spatial_merge_size=1),
            image_token_id=last, video_token_id=last - 1, vision_start_token_id=last - 2)
        return transformers.Qwen2VLForConditionalGeneration(config)
    if family == "gemma3":
        config = transformers.Gemma3Config(
            text_config={"model_type": "gemma3_text", **text, "head_dim": 8, "sliding_window": 8},
            vision_config={"model_type": "siglip_vision_model", **VISION}, mm_tokens_per_image=4,
            image_token_index=last, boi_token_index=last - 2, eoi_token_index=last - 1)
        return transformers.Gemma3ForConditionalGeneration(config)
    raise ValueError(family)


def added_token_vlms(root):
    """Two LLaVA fine-tunes with tokenizers, the second of which added two tokens (its nested vocab_size 18)."""
    from transformers import AddedToken

    folders = []
    for i, added in enumerate([[], ["<x>", "<|im_start|>"]]):
        tok = tiny_tokenizer()
        tok.add_tokens([AddedToken("<image>", special=True)])
        model = build_vlm("llava", vocab_size=len(tok))
        tok.add_tokens([AddedToken(t, special=t.startswith("<|")) for t in added])
        model.resize_token_embeddings(len(tok))
        perturb(model.parameters(), i)
        folders.append(root / f"ft{i}")
        model.save_pretrained(folders[-1])
        tok.save_pretrained(folders[-1])
    return folders


def _loaded(folder, adapter=None):
    """The model as transformers (and peft, for an adapter: `merge_and_unload()`) loads it, and the load's report."""
    from peft import PeftModel

    model, info = transformers.AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model, info


def make_vlm_adapter(base, out, seed):
    """A peft LoRA adapter of the model in `base`, every trained tensor moved by seeded noise (B starts at zero)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(transformers.AutoModelForImageTextToText.from_pretrained(base), LoraConfig(**LORA))
    perturb((p for p in model.parameters() if p.requires_grad), seed)
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return out


# LoRA on the language model's attention and MLP (and, on LLaVA, CLIP's q_proj / v_proj too), per-module rank
# (matched against the loaded names, as peft matches it) and an embedding LoRA.
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
            rank_pattern={"v_proj": 2})


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_lora_on_a_vision_language_model_is_the_mean_of_peft_merges(family, tmp_path, monkeypatch):
    base = tmp_path / "base"
    build_vlm(family).save_pretrained(base)
    adapters = [make_vlm_adapter(base, tmp_path / f"lora{i}", seed=i) for i in (1, 2)]
    out = merge(adapters, tmp_path / "soup", optimizer="sgd", progress=False).path
    references = [_loaded(base, a)[0] for a in adapters]
    merged, info = _loaded(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    got, states = merged.state_dict(), [r.state_dict() for r in references]
    assert set(got) == set(states[0])
    for name, value in got.items():
        expected = (states[0][name].double() + states[1][name].double()) / 2
        assert torch.allclose(value.double(), expected, atol=1e-6), name
    expected = references[0]
    # the output's layout: the names save_pretrained of the loaded model writes (the base's, here)
    expected.save_pretrained(tmp_path / "reference")
    assert set(load_file(out / "model.safetensors")) == set(load_file(tmp_path / "reference" / "model.safetensors"))
    # Adam: the whole-model reference on what peft loads; small blocks: the same bytes
    config = AmeConfig(optimizer="adam", lr=1e-3, epochs=2)
    adam = _loaded(merge(adapters, tmp_path / "adam", config, progress=False).path)[0].state_dict()
    for name, value in reference_ame_states(states, config).items():
        assert torch.allclose(adam[name].double(), value.double(), atol=1e-6), name
    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 100)
    sliced = merge(adapters, tmp_path / "sliced", optimizer="sgd", progress=False).path
    assert weights_sha256(sliced) == weights_sha256(out)


def test_vision_language_finetunes_that_added_tokens_merge_by_token(tmp_path):
    """Two LLaVA fine-tunes, one of which added tokens: rows are matched by token, the output's nested
    `text_config.vocab_size` and tokenizer match its rows, and it loads with no missing or unexpected key."""
    from transformers import AutoTokenizer

    folders = added_token_vlms(tmp_path)
    out = tmp_path / "union"
    assert main(["merge", *map(str, folders), "--out", str(out), "--quiet", "--optimizer", "sgd"]) == 0
    tok, toks = AutoTokenizer.from_pretrained(out), [AutoTokenizer.from_pretrained(f) for f in folders]
    config = json.loads((out / "config.json").read_text())
    model, info = _loaded(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert config["text_config"]["vocab_size"] == embed.shape[0] == head.shape[0] == len(tok) == 18
    inputs = [_loaded(f)[0] for f in folders]
    rows = [(m.get_input_embeddings().weight.double(), m.get_output_embeddings().weight.double()) for m in inputs]
    for token, row in tok.get_vocab().items():
        assert tok.convert_tokens_to_ids(token) == row
        owners = [i for i, t in enumerate(toks) if token in t.get_vocab()]
        for k, out_rows in enumerate((embed, head)):
            expected = sum(rows[i][k][toks[i].convert_tokens_to_ids(token)] for i in owners) / len(owners)
            assert torch.allclose(out_rows[row].double(), expected, atol=1e-6), (token, owners)
    # every other tensor: the mean of the two
    states = [m.state_dict() for m in inputs]
    for name, value in model.state_dict().items():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.allclose(value.double(), (states[0][name].double() + states[1][name].double()) / 2,
                                  atol=1e-6), name


def test_a_finetune_saved_under_the_loaded_names_merges_with_one_saved_as_usual(tmp_path):
    """transformers loads a LLaVA saved under the names the model loads it by (`save_original_format=False`) as
    one saved as usual: the two merge, into the usual layout."""
    folders = []
    for i, original in enumerate((True, False)):
        model = build_vlm("llava", seed=i)
        folders.append(tmp_path / f"ft{i}")
        model.save_pretrained(folders[-1], save_original_format=original)
    stored = [set(load_file(f / "model.safetensors")) for f in folders]
    assert "language_model.model.embed_tokens.weight" in stored[0] and not stored[0] & stored[1]
    out = merge(folders, tmp_path / "soup", optimizer="sgd", progress=False).path
    assert set(load_file(out / "model.safetensors")) == stored[0]
    merged, info = _loaded(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    states = [_loaded(f)[0].state_dict() for f in folders]
    for name, value in merged.state_dict().items():
        expected = (states[0][name].double() + states[1][name].double()) / 2
        assert torch.allclose(value.double(), expected, atol=1e-6), name


def test_an_adapter_of_a_resized_vision_language_vocabulary_merges_by_token(tmp_path):
    """A LLaVA adapter trained after `resize_token_embeddings` (its token rows in modules_to_save) merged with a full
    fine-tune of the base: the shared rows averaged, the new ones the adapter's, the nested vocab_size its rows."""
    from transformers import AddedToken, AutoTokenizer
    from test_adapter_forms import make_adapter, peft_model_of

    tok = tiny_tokenizer()
    tok.add_tokens([AddedToken("<image>", special=True)])
    base, full = tmp_path / "base", tmp_path / "full"
    build_vlm("llava", vocab_size=len(tok)).save_pretrained(base)
    model = build_vlm("llava", vocab_size=len(tok))
    perturb(model.parameters(), 3)
    model.save_pretrained(full)
    for folder in (base, full):
        tok.save_pretrained(folder)
    tok.add_tokens(["<x>", "<y>"])
    loader, rows = transformers.AutoModelForImageTextToText, len(tok)
    adapter = make_adapter(base, tmp_path / "lora", 0, loader, resize=rows, target_modules=["q_proj"],
                           modules_to_save=["embed_tokens", "lm_head"])
    tok.save_pretrained(adapter)
    reference = peft_model_of(base, adapter, loader, resize=rows)
    fine_tune = _loaded(full)[0].state_dict()
    out = merge([full, adapter], tmp_path / "soup", optimizer="sgd", progress=False).path
    merged, info = _loaded(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert json.loads((out / "config.json").read_text())["text_config"]["vocab_size"] == rows == 18
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<y>") == 17
    for name, value in merged.state_dict().items():
        expected = reference[name].double().clone()
        shared = slice(0, 16) if name in ("model.language_model.embed_tokens.weight", "lm_head.weight") else slice(None)
        expected[shared] = (expected[shared] + fine_tune[name][shared].double()) / 2
        assert torch.allclose(value.double(), expected, atol=1e-6), name


def blip2_led(rows: int = 56) -> transformers.PreTrainedModel:
    """A tiny BLIP-2 whose language model is sequence-to-sequence (LED, as BLIP-2 takes Flan-T5): its
    `language_model.final_logits_bias` ([1, vocab]) follows the vocabulary of the nested text config."""
    text = dict(model_type="led", vocab_size=rows, d_model=16, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                max_encoder_position_embeddings=64, max_decoder_position_embeddings=64, attention_window=[4],
                pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1)
    config = transformers.Blip2Config(vision_config=VISION, text_config=text, num_query_tokens=2,
                                      qformer_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, encoder_hidden_size=16, vocab_size=30))
    return transformers.Blip2ForConditionalGeneration(config)


@pytest.mark.parametrize("source", [None, "1"])
def test_a_token_indexed_column_of_a_nested_text_config_is_matched_by_token(tmp_path, source):
    """The vocabulary of a vision-language model lives in its text config: its token-indexed columns (the seq2seq
    language model's final_logits_bias) are found from that vocabulary size too, and matched by token like the rows
    (merged by index, the new tokens' biases would be averaged with another ingredient's padding)."""
    from test_vocab_forms import assert_soup_by_token, merge as merge_cli, save_family, word_tokenizer
    from ame_hf import check

    paths = save_family(tmp_path / "in", blip2_led, word_tokenizer, [[], ["<a>", "<b>"]])
    report = check(paths, **({"tokenizer_source": int(source)} if source else {}))
    assert report.ok, report.errors
    assert any("language_model.final_logits_bias" in n and "matched by token" in n for n in report.notes), report.notes
    merge_cli(paths, tmp_path / "out", *(["--tokenizer-source", source] if source else []))
    assert_soup_by_token(tmp_path / "out", paths, transformers.AutoModelForImageTextToText)
