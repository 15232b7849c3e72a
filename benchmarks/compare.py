"""Compare the weights of two model directories tensor by tensor; print one JSON line.

    python benchmarks/compare.py A B
    {"tensors": 147, "max_abs_diff": 1.2e-07, "differing": 12345, "beyond_rounding": 0, ...}

`beyond_rounding` counts elements that differ by more than one rounding step of the output dtype
(2^-mantissa relative, plus 1e-6 absolute): the fair test for bf16 outputs, where computing the
same float32 mean in another order may flip the last bf16 bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from plain_average import weight_files

ATOL = 1e-6


def compare(a: Path, b: Path) -> dict:
    map_a, map_b = weight_files(a), weight_files(b)
    result = {"tensors": len(map_a), "max_abs_diff": 0.0, "max_abs_diff_tensor": None, "differing": 0,
              "beyond_rounding": 0, "numel": 0, "problems": []}
    if set(map_a) != set(map_b):
        result["problems"].append(f"tensor names differ: only in A {sorted(set(map_a) - set(map_b))[:5]}, "
                                  f"only in B {sorted(set(map_b) - set(map_a))[:5]}")
    for name in sorted(set(map_a) & set(map_b)):
        with safe_open(map_a[name], framework="pt") as fa, safe_open(map_b[name], framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.shape != y.shape or x.dtype != y.dtype:
            result["problems"].append(f"{name}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
            continue
        result["numel"] += x.numel()
        if not x.is_floating_point():
            result["differing"] += int((x != y).sum())
            continue
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            result["problems"].append(f"{name}: NaN or Inf")
        diff = (x.double() - y.double()).abs()
        result["differing"] += int((diff > 0).sum())
        top = float(diff.max()) if diff.numel() else 0.0
        if top > result["max_abs_diff"]:
            result["max_abs_diff"], result["max_abs_diff_tensor"] = top, name
        # One rounding flip of the output dtype: 2^-mantissa relative (bf16: 1/128), plus 1e-6 absolute.
        rtol = 2.0 ** -_mantissa(x.dtype)
        bound = ATOL + rtol * torch.maximum(x.double().abs(), y.double().abs())
        result["beyond_rounding"] += int((diff > bound).sum())
    return result


def _mantissa(dtype: torch.dtype) -> int:
    return {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}[dtype]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(compare(Path(args[0]), Path(args[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
