"""Build the benchmark's ingredients: a Llama from a config, with a shared init and N copies that
differ by seeded deltas, saved with `save_pretrained` (fp32 and, optionally, bf16).

Run by `run.py` in its own process (so its memory is freed before any measurement); usable alone:

    python benchmarks/build_inputs.py --model small --copies 8 --bf16-copies 4 --out benchmarks/_work/models
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# name -> LlamaConfig fields. Parameter counts are checked at build time (see `param_count`).
MODELS = {
    "small": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, vocab_size=32000,
                  num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False),
    "large": dict(hidden_size=1536, num_hidden_layers=16, intermediate_size=4096, vocab_size=32000,
                  num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False),
    # 1.1B parameters (TinyLlama's shape: grouped-query attention), built in bf16: the throughput row.
    "1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, vocab_size=32000,
               num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False),
    # Only for smoke tests of the harness itself (`run.py --smoke`).
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=512,
                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
}

INIT_SEED = 0
DELTA_SCALE = 0.01


def param_count(name: str) -> int:
    """Parameters of a Llama with untied embeddings and no biases (q, k, v, o, gate, up, down, 2 norms)."""
    c = MODELS[name]
    h, i, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * v * h + layers * per_layer + h


def copy_dir(root: Path, model: str, dtype: str, index: int) -> Path:
    return root / f"{model}-{dtype}-{index}"


def _complete(path: Path) -> bool:
    return (path / ".complete").is_file()


def build(model: str, copies: int, bf16_copies: int, root: Path) -> None:
    todo = [i for i in range(copies) if not _complete(copy_dir(root, model, "fp32", i))]
    todo_bf16 = [i for i in range(bf16_copies) if not _complete(copy_dir(root, model, "bf16", i))]
    if not todo and not todo_bf16:
        print(f"[build] {model}: {copies} fp32 + {bf16_copies} bf16 copies already built", flush=True)
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    torch.manual_seed(INIT_SEED)
    config = LlamaConfig(**MODELS[model])
    net = LlamaForCausalLM(config).float().eval()
    count = sum(p.numel() for p in net.parameters())
    if count != param_count(model):
        raise SystemExit(f"{model}: built {count} parameters, expected {param_count(model)}")
    print(f"[build] {model}: {count / 1e6:.1f}M parameters; building copies "
          f"{sorted(set(todo) | set(todo_bf16))}", flush=True)
    # The shared init; each copy is init + DELTA_SCALE * randn from its own seed, made in place.
    init = {name: p.detach().clone() for name, p in net.named_parameters()}
    for i in sorted(set(todo) | set(todo_bf16)):
        gen = torch.Generator().manual_seed(1000 + i)
        net.float()
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(init[name])
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32), alpha=DELTA_SCALE)
        for dtype, wanted, torch_dtype in (("fp32", todo, torch.float32), ("bf16", todo_bf16, torch.bfloat16)):
            if i not in wanted:
                continue
            out = copy_dir(root, model, dtype, i)
            net.to(torch_dtype)
            net.save_pretrained(out)
            (out / ".complete").write_text(json.dumps({"model": model, "copy": i, "dtype": dtype}) + "\n")
            print(f"[build]   {out.name}", flush=True)
    print(f"[build] {model}: done in {time.perf_counter() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--copies", type=int, required=True, help="fp32 copies to build")
    p.add_argument("--bf16-copies", type=int, default=0, help="bf16 copies to build (the first ones)")
    p.add_argument("--out", type=Path, required=True, help="models directory")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    build(args.model, args.copies, args.bf16_copies, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
