"""Tiny model checkpoints for the tests, built from configs and saved with `save_pretrained`.

"Fine-tunes" are one base model plus a seeded perturbation per ingredient; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                  tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    values = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, max_position_embeddings=32, num_labels=3)
    values.update(overrides)
    return BertConfig(**values)


def build_base(kind: str = "llama", seed: int = 0, **overrides):
    """A freshly initialised tiny model (`llama` causal LM, or `bert` sequence classifier)."""
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(tiny_llama_config(**overrides))
    if kind == "bert":
        return BertForSequenceClassification(tiny_bert_config(**overrides))
    raise ValueError(kind)


def make_finetunes(
    root: Path,
    n: int = 3,
    *,
    kind: str = "llama",
    dtype: torch.dtype = torch.float32,
    scale: float = 0.02,
    seed: int = 0,
    names: Sequence[str] | None = None,
    max_shard_size: str | None = None,
    **overrides,
) -> list[Path]:
    """Save `n` perturbed copies of one base model under `root`; returns their directories."""
    base = build_base(kind, seed=seed, **overrides).to(dtype)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = []
    for i in range(n):
        gen = torch.Generator().manual_seed(1000 * (seed + 1) + i)
        with torch.no_grad():
            for name, param in base.state_dict().items():
                if param.is_floating_point():
                    noise = torch.randn(param.shape, generator=gen) * scale
                    param.copy_((state[name].float() + noise).to(dtype))
        path = root / (names[i] if names else f"ft{i}")
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        base.save_pretrained(path, **kwargs)
        paths.append(path)
    return paths


def save_base(root: Path, kind: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """The unperturbed base model (a pivot checkpoint)."""
    model = build_base(kind, seed=seed, **overrides).to(dtype)
    model.save_pretrained(root)
    return root


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved model directory (single or sharded safetensors)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def weights_sha256(path: Path) -> dict[str, str]:
    """sha256 of every weight file (and the index) of an output directory."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(path).iterdir()) if f.name.endswith((".safetensors", ".index.json"))}


# -- tiny text classifiers (for evaluate / tune) ------------------------------------------------

COLORS = ["red", "green", "blue"]
FILLER = ["the", "a", "cat", "dog", "runs", "sits", "big", "small"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *COLORS, *FILLER]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def color_examples(n: int, seed: int, label_weights=(1.0, 1.0, 1.0)):
    """Sentences whose label is the colour word they contain."""
    gen = torch.Generator().manual_seed(seed)
    label_dist = torch.tensor(label_weights, dtype=torch.float)
    out = []
    for _ in range(n):
        label = int(torch.multinomial(label_dist, 1, generator=gen))
        words = [COLORS[label]] + [FILLER[int(i)] for i in torch.randint(0, len(FILLER), (4,), generator=gen)]
        order = torch.randperm(len(words), generator=gen)
        out.append((" ".join(words[int(i)] for i in order), label))
    return out


def make_text_classifiers(root: Path, n: int = 3, steps: int = 60) -> tuple[list[Path], Path]:
    """`n` tiny BERT classifiers fine-tuned from one base on label-skewed data, and a balanced
    validation JSONL file. Returns (expert directories, validation file)."""
    import json

    from transformers import BertForSequenceClassification

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = tiny_bert_config(vocab_size=len(tokenizer), num_labels=3,
                              id2label={i: c for i, c in enumerate(COLORS)},
                              label2id={c: i for i, c in enumerate(COLORS)})
    base = BertForSequenceClassification(config)
    base.save_pretrained(root / "base")
    paths = []
    for i in range(n):
        model = BertForSequenceClassification.from_pretrained(root / "base")
        weights = [0.1] * 3
        weights[i % 3] = 1.0
        data = color_examples(32 * steps, seed=10 + i, label_weights=weights)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for s in range(steps):
            batch = data[32 * s: 32 * (s + 1)]
            enc = tokenizer([t for t, _ in batch], return_tensors="pt", padding=True)
            loss = model(**enc, labels=torch.tensor([l for _, l in batch])).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        path = root / f"expert{i}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps({"text": t, "label": COLORS[l]}) + "\n" for t, l in color_examples(90, seed=99)))
    return paths, val
