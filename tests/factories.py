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
