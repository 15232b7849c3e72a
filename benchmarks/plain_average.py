"""The plain-script floor: the uniform average of N checkpoints, the way one would write it by hand.

Reads every input tensor by tensor with `safetensors.safe_open`, averages in float32, keeps the
whole result in memory and writes it with `safetensors.torch.save_file` (plus config.json):

    python benchmarks/plain_average.py IN1 IN2 ... --out OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="uniform average of safetensors checkpoints (float32)")
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    maps = [weight_files(d) for d in args.inputs]
    handles: dict[Path, object] = {}

    def tensor(i: int, name: str) -> torch.Tensor:
        file = maps[i][name]
        if file not in handles:
            handles[file] = safe_open(file, framework="pt")
        return handles[file].get_tensor(name)

    merged = {}
    for name in sorted(maps[0]):
        first = tensor(0, name)
        acc = first.to(torch.float32, copy=True)
        for i in range(1, len(maps)):
            acc += tensor(i, name).to(torch.float32)
        acc /= len(maps)
        merged[name] = acc.to(first.dtype)

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(merged, args.out / "model.safetensors", metadata={"format": "pt"})
    shutil.copyfile(args.inputs[0] / "config.json", args.out / "config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
