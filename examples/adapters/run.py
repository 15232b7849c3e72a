"""LoRA adapters and fine-tunes that added tokens, merged with ame-hf — built locally, checked against peft.

    python examples/adapters/run.py [--out DIR]   # about 20 s on 2 cores; writes ./ame-adapters-example/ (git-ignored)

1. A tiny Llama base with a word-level tokenizer; two LoRA adapters of it made with peft (one with an
   embedding LoRA, per-module ranks and `modules_to_save`, one rsLoRA), and a full fine-tune that added
   a chat token (`<|im_start|>`) and resized its embeddings.
2. `ame-hf merge` of the two adapters and the full fine-tune: the soup, and the default AME from the
   adapters' base (`--pivot base`). Adapters are read as `W_base + delta` block by block; the added
   token's rows are merged over the ingredients that have it (here: only the full fine-tune).
3. Checks, printed: the soup equals the mean of peft's `merge_and_unload()` models (max abs diff), the
   output tokenizer encodes the new token to its row, and the merge loads with `from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AddedToken, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

WORDS = ["<unk>", "<s>", "</s>", "the", "a", "cat", "dog", "sits", "runs", "red", "blue", "on", "mat"]


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def perturb(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("ame-adapters-example"),
                        help="where the models and merges go (default ./ame-adapters-example, git-ignored)")
    work = parser.parse_args(argv).out
    work.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per tiny model says nothing here
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(work / "base")
    tokenizer().save_pretrained(work / "base")
    loras = [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                        modules_to_save=["lm_head"], rank_pattern={"v_proj": 2}),
             LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["up_proj", "down_proj"])]
    references = []
    for i, lora in enumerate(loras):
        model = get_peft_model(LlamaForCausalLM.from_pretrained(work / "base"), lora)
        perturb(model, seed=i)
        model.save_pretrained(work / f"adapter-{i}")  # adapter_config.json names work/base as its base
        merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(work / "base"), work / f"adapter-{i}")
        references.append({k: v.detach().double() for k, v in merged.merge_and_unload().state_dict().items()})
    full = LlamaForCausalLM.from_pretrained(work / "base")  # a full fine-tune that added a chat token
    tok = tokenizer()
    tok.add_tokens([AddedToken("<|im_start|>", special=True)])
    full.resize_token_embeddings(len(tok))
    perturb(full, seed=9)
    full.save_pretrained(work / "full-ft")
    tok.save_pretrained(work / "full-ft")

    ingredients = [str(work / "adapter-0"), str(work / "adapter-1"), str(work / "full-ft")]
    for out, options in (("soup", ["--optimizer", "sgd"]), ("ame-from-base", ["--pivot", "base"])):
        cmd = ["ame-hf", "merge", *ingredients, "--out", str(work / out), "--overwrite", "--quiet", *options]
        print("$", " ".join(cmd))
        subprocess.run([sys.executable, "-m", "ame_hf", *cmd[1:]], check=True)

    soup = load_file(work / "soup" / "model.safetensors")
    full_state = load_file(work / "full-ft" / "model.safetensors")
    new_row = len(WORDS)  # the added token: only the full fine-tune has it
    worst = 0.0
    for name, value in soup.items():
        rows = [references[0][name], references[1][name], full_state[name].double()]
        if value.shape[0] == len(WORDS) + 1 and rows[0].shape[0] == len(WORDS):  # token-indexed
            expected = torch.cat([sum(r[:new_row] for r in rows) / 3, rows[2][new_row:]])
        else:
            expected = sum(rows) / 3
        worst = max(worst, float((value.double() - expected).abs().max()))
    merged_tok = AutoTokenizer.from_pretrained(work / "soup")
    LlamaForCausalLM.from_pretrained(work / "ame-from-base")
    print(json.dumps({
        "soup vs mean of peft merge_and_unload models (max abs diff)": worst,
        "vocab_size of the merge": json.loads((work / "soup" / "config.json").read_text())["vocab_size"],
        "id of <|im_start|> in the merged tokenizer": merged_tok.convert_tokens_to_ids("<|im_start|>"),
        "ame-from-base loads with from_pretrained": True,
    }, indent=2))
    return 0 if worst < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
