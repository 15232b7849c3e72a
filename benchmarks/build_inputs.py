"""Build the benchmark's ingredients: a Llama from a config, with a shared init and N copies that
differ by seeded deltas, saved with `save_pretrained` (fp32 and, optionally, bf16).

Run by `run.py` in its own process (so its memory is freed before any measurement); usable alone:

    python benchmarks/build_inputs.py --model small --copies 8 --bf16-copies 4 --out benchmarks/_work/models
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    # 3.2B parameters (Llama-3.2-3B's shape: tied embeddings, 128256 tokens), bf16 only and written tensor by
    # tensor (`build_direct`): the largest row this machine's disk holds (3 copies: 19.3 GB).
    "3b": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, vocab_size=128256,
               num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    # Only for smoke tests of the harness itself (`run.py --smoke`).
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=512,
                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
}

INIT_SEED = 0
DELTA_SCALE = 0.01
DIRECT = {"3b"}  # built by `build_direct`: bf16 only, tensor by tensor


def param_count(name: str) -> int:
    """Parameters of a Llama with no biases (q, k, v, o, gate, up, down, 2 norms), embeddings tied or not."""
    c = MODELS[name]
    h, i, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return (1 if c["tie_word_embeddings"] else 2) * v * h + layers * per_layer + h


def copy_dir(root: Path, model: str, dtype: str, index: int) -> Path:
    return root / f"{model}-{dtype}-{index}"


def _complete(path: Path) -> bool:
    return (path / ".complete").is_file()


def build_direct(model: str, copies: int, root: Path, shard_bytes: int = 2 << 30,
                 chunk: int = 1 << 25) -> None:
    """bf16 copies written tensor by tensor, never a whole model in memory (a 3B model's fp32 copy is 13 GB):
    the names and shapes come from a model on the meta device; each tensor is init + DELTA_SCALE * randn, made
    in chunks of rows from generators seeded per tensor (init: 10**6 + t; copy i: 1000 + i + 10**4 * t) and
    written in shards of at most `shard_bytes` with a `model.safetensors.index.json`, as save_pretrained
    lays a sharded checkpoint out. Init: normal(0, initializer_range), norms 1, as LlamaForCausalLM's."""
    todo = [i for i in range(copies) if not _complete(copy_dir(root, model, "bf16", i))]
    if not todo:
        print(f"[build] {model}: {copies} bf16 copies already built", flush=True)
        return

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    config = LlamaConfig(**MODELS[model])
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).named_parameters()}  # tied: one entry
    count = sum(shape.numel() for shape in shapes.values())
    if count != param_count(model):
        raise SystemExit(f"{model}: {count} parameters on the meta device, expected {param_count(model)}")
    print(f"[build] {model}: {count / 1e6:.1f}M parameters, bf16, tensor by tensor; copies {todo}", flush=True)
    config.dtype = torch.bfloat16
    for i in todo:
        out = copy_dir(root, model, "bf16", i)
        shutil.rmtree(out, ignore_errors=True)  # an interrupted build's shards
        out.mkdir(parents=True)
        current: dict[str, torch.Tensor] = {}
        shards: list[list[str]] = []  # the names of each written shard

        def flush() -> None:
            save_file(current, out / f"shard-{len(shards) + 1}.safetensors", metadata={"format": "pt"})
            shards.append(list(current))
            current.clear()

        for t, (name, shape) in enumerate(shapes.items()):
            init, delta = torch.Generator().manual_seed(10 ** 6 + t), torch.Generator().manual_seed(1000 + i + 10 ** 4 * t)
            value = torch.empty(shape, dtype=torch.bfloat16)
            rows = value.view(shape[0], -1)
            step = max(1, chunk // rows.shape[1])
            for start in range(0, rows.shape[0], step):
                n = min(step, rows.shape[0] - start)
                if name.endswith("norm.weight"):
                    part = torch.ones(n, rows.shape[1])
                else:
                    part = torch.randn(n, rows.shape[1], generator=init).mul_(config.initializer_range)
                part.add_(torch.randn(n, rows.shape[1], generator=delta), alpha=DELTA_SCALE)
                rows[start:start + n] = part
            if current and sum(v.numel() * 2 for v in current.values()) + value.numel() * 2 > shard_bytes:
                flush()  # at most one shard in memory
            current[name] = value
        if current:
            flush()
        files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        weight_map = {}
        for k, names in enumerate(shards):
            (out / f"shard-{k + 1}.safetensors").rename(out / files[k])
            weight_map.update({name: files[k] for name in names})
        total = 2 * count  # bytes of tensor data, as save_pretrained records it
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        config.save_pretrained(out)
        (out / ".complete").write_text(json.dumps({"model": model, "copy": i, "dtype": "bf16"}) + "\n")
        print(f"[build]   {out.name} ({total / 1e9:.1f} GB, {time.perf_counter() - started:.0f} s)", flush=True)
    print(f"[build] {model}: done in {time.perf_counter() - started:.0f} s", flush=True)


def build(model: str, copies: int, bf16_copies: int, root: Path) -> None:
    if model in DIRECT:
        if copies:
            raise SystemExit(f"{model}: bf16 copies only (--copies 0 --bf16-copies N)")
        return build_direct(model, bf16_copies, root)
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
