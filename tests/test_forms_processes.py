"""The cut never shows for the forms issue 22 added: a vision-language adapter merge, vision-language fine-tunes that
added tokens, adapters that carry tokens (modules_to_save after a resize, trainable_token_indices), LoRA on experts
stored `[in, out]`, padded vocabularies, T5's Unigram tokenizer, BART's `final_logits_bias` and keys transformers
drops on load give the same output bytes whole, in small blocks (`AME_HF_BLOCK_ELEMENTS`) and over two processes.
That each form equals what transformers / peft load is checked in its own test file (MoE layouts: test_moe.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import ame_hf.plan as plan
from ame_hf.cli import main
from factories import build_base, load_state, make_lora_adapter, tiny_tokenizer, weights_sha256
from test_adapter_forms import make_adapter
from test_ignored_keys import gpt2_with_ignored_keys
from test_moe import TRANSPOSED_ADAPTERS, tiny_transposed_moe
from test_vision_language import added_token_vlms, build_vlm, make_vlm_adapter
from test_vocab_forms import bart, qwen, save_family, t5, unigram_tokenizer, word_tokenizer

SMALL = 24  # elements in one block: every matrix here is cut into many blocks, token rows included
# An optimizer whose every step depends on the one before, batches in shuffled order, shards cut small.
OPTIONS = ["--relative-lr", "0.1", "--shuffle", "--epochs", "2", "--max-shard-size", "8KB", "--device", "cpu",
           "--quiet"]


def _vlm_adapters(root: Path, family: str) -> list[Path]:
    build_vlm(family).save_pretrained(root / "base")
    return [make_vlm_adapter(root / "base", root / f"lora{i}", seed=i) for i in (1, 2)]


def _resized_modules_to_save(root: Path) -> list[Path]:
    """An adapter trained after a resize (its token rows in modules_to_save) beside a full fine-tune of the base."""
    tok = tiny_tokenizer()
    build_base("llama", vocab_size=len(tok)).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    build_base("llama", seed=3, vocab_size=len(tok)).save_pretrained(root / "full")
    tok.save_pretrained(root / "full")
    tok.add_tokens(["<x>", "<y>"])
    adapter = make_adapter(root / "base", root / "lora", 0, resize=len(tok), target_modules=["q_proj"],
                           modules_to_save=["embed_tokens", "lm_head"])
    tok.save_pretrained(adapter)
    return [root / "full", adapter]


def _trainable_tokens(root: Path) -> list[Path]:
    """Two TrainableTokens adapters of a tied model, trained after a resize (rows 15 and 16 new)."""
    tok = tiny_tokenizer()
    build_base("llama", vocab_size=len(tok), tie_word_embeddings=True).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    tok.add_tokens(["<x>", "<y>"])
    adapters = []
    for seed in (0, 1):
        adapters.append(make_adapter(root / "base", root / f"tokens{seed}", seed, resize=len(tok),
                                     target_modules=["q_proj"], trainable_token_indices=[3, 5, 15, 16]))
        tok.save_pretrained(adapters[-1])
    return adapters


def _experts_in_out(root: Path) -> list[Path]:
    tiny_transposed_moe("gpt_oss").save_pretrained(root / "base")
    return [make_lora_adapter(root / "base", root / k, o, seed=i + 1)
            for i, (k, o) in enumerate(TRANSPOSED_ADAPTERS.items())]


FORMS = {
    "vlm-lora-llava": lambda root: _vlm_adapters(root, "llava"),
    "vlm-lora-qwen2_vl": lambda root: _vlm_adapters(root, "qwen2_vl"),
    "vlm-added-tokens": added_token_vlms,
    "modules-to-save-resized": _resized_modules_to_save,
    "trainable-tokens-tied-resized": _trainable_tokens,
    "moe-experts-in-out": _experts_in_out,
    # added inside the padding, and grown past it
    "padded-vocab": lambda root: save_family(root, qwen, word_tokenizer, [[], ["<a>"], [f"<n{i}>" for i in range(10)]],
                                             resize=64),
    "t5-unigram-added": lambda root: save_family(root, t5, unigram_tokenizer, [["<a>"], ["<b>"], []]),
    "bart-final-logits-bias": lambda root: save_family(root, lambda: bart(56), word_tokenizer, [[], ["<a>", "<b>"]]),
    "ignored-keys-gpt2": lambda root: gpt2_with_ignored_keys(root, 1),
}


def _output(out: Path) -> dict[str, str]:
    """What must not change: every weight file's sha256, the config and the tokenizer."""
    files = {f: (out / f).read_text() for f in ("config.json", "tokenizer.json") if (out / f).is_file()}
    return {**weights_sha256(out), **files}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_whole_small_blocks_and_two_processes_write_the_same_bytes(form, tmp_path, monkeypatch):
    refs = [str(r) for r in FORMS[form](tmp_path / "in")]
    assert main(["merge", *refs, "--out", str(tmp_path / "whole"), *OPTIONS]) == 0
    whole = _output(tmp_path / "whole")
    merged = load_state(tmp_path / "whole")
    assert any(len(plan.row_blocks(tuple(t.shape), SMALL)) > 2 for t in merged.values())  # the blocks do cut

    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", SMALL)
    assert main(["merge", *refs, "--out", str(tmp_path / "small"), *OPTIONS]) == 0
    assert _output(tmp_path / "small") == whole

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ame_hf",
           "merge", *refs, "--out", str(tmp_path / "two"), *OPTIONS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AME_HF_BLOCK_ELEMENTS": str(SMALL + 16)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _output(tmp_path / "two") == whole
    if "tokenizer.json" in whole:  # the tokenizer encodes every token to its own row
        vocab = AutoTokenizer.from_pretrained(tmp_path / "whole").get_vocab()
        assert len(set(vocab.values())) == len(vocab)
