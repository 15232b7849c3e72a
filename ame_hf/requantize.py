"""A merge of FP8 ingredients written back in their format (`dtype="float8_e4m3fn"`): every tensor an FP8 ingredient
stores quantized is quantized again with the same block layout, its scales computed per block by transformers' own
quantizing op (`Fp8Quantize`), shard by shard of the finished output, one band of block rows at a time."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Sequence

import torch

from ._weight_files import SAFE_INDEX, SAFE_SINGLE, read_header
from .checkpoint import stored_dtype
from .errors import IncompatibleCheckpointsError

FP8_OUTPUT = "float8_e4m3fn"
_BAND_ELEMENTS = 1 << 22  # elements quantized at once (whole bands of block rows: no cut inside a block)
_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def fp8_layout(checkpoints: Sequence[Any]) -> tuple[dict[str, Any], dict[str, tuple[int, int]]] | str:
    """The FP8 layout the output takes from its FP8 ingredients: (their `quantization_config`, output name -> block),
    or why there is none (no FP8 ingredient, one scale per tensor, ingredients whose blocks differ).

    Args:
        checkpoints: the ingredients as the report sees them (under the output's names).

    Returns:
        The layout, or the reason as one line.
    """
    configs, names = [], {}
    for ckpt in checkpoints:
        quantized = getattr(ckpt, "dequantized", None) or {}
        mine = {n: quantized[s] for n, s in ckpt.stored.items() if s in quantized and quantized[s].method == "fp8"}
        if not mine:
            continue
        blocks = {q.block for q in mine.values()}
        if None in blocks:
            return f"dtype={FP8_OUTPUT!r}: {ckpt.name} has one FP8 scale per tensor; ame-hf re-quantizes block-scaled FP8 only"
        configs.append((ckpt.name, ckpt.config["quantization_config"]))
        names.update({n: q.block for n, q in mine.items()})
    if not configs:
        return (f"dtype={FP8_OUTPUT!r} writes the merge in its FP8 ingredients' format, but no ingredient is FP8 "
                "(quantization_config.quant_method fp8); choose auto, float32, bfloat16 or float16")
    layouts = {json.dumps(_layout(c), sort_keys=True) for _, c in configs}
    if len(layouts) > 1:
        return (f"dtype={FP8_OUTPUT!r}: the FP8 ingredients differ in their layout ("
                + "; ".join(f"{n}: {_layout(c)}" for n, c in configs) + "); choose auto to write the merge dequantized")
    return dict(configs[0][1]), names


def fp8_output_check(config: Any, checkpoints: Sequence[Any]) -> None:
    """Before a download: an FP8 output needs FP8 ingredients of one block layout.

    Args:
        config: the run's `AmeConfig`.
        checkpoints: the ingredients as the report sees them.

    Raises:
        IncompatibleCheckpointsError: `dtype` is float8_e4m3fn and there is no such layout (one line saying why).
    """
    if config.dtype == FP8_OUTPUT:
        layout = fp8_layout(checkpoints)
        if isinstance(layout, str):
            raise IncompatibleCheckpointsError(layout, fields=("dtype",))


def _layout(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config.get(k) for k in ("weight_block_size", "scale_fmt", "activation_scheme")}


def card_text(checkpoints: Sequence[Any]) -> str:
    """What the card says of the output dtype of an FP8 output.

    >>> card_text(report.checkpoints)  # doctest: +SKIP
    'float8_e4m3fn as its FP8 ingredients (252 tensors in 128x128 blocks, ...)'
    """
    layout = fp8_layout(checkpoints)
    if isinstance(layout, str):
        return FP8_OUTPUT
    config, names = layout
    rows, cols = config["weight_block_size"]
    return (f"{FP8_OUTPUT} as its FP8 ingredients ({len(names)} tensors in {rows}x{cols} blocks, each block's "
            "weight_scale_inv computed from the merged values by transformers' Fp8Quantize; the other tensors in "
            "the ingredients' dtype)")


def requantize(staging: Path, checkpoints: Sequence[Any]) -> dict[str, Any]:
    """Rewrite the finished output's shards in `staging` with its FP8 tensors quantized (each shard written beside
    itself, then moved over it), and its index with the scales. Memory: one band of block rows at a time.

    Args:
        staging: the staging directory, its shards (and index) written dequantized.
        checkpoints: the ingredients as the report sees them.

    Returns:
        The `quantization_config` the output's config takes.
    """
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    layout = fp8_layout(checkpoints)
    assert not isinstance(layout, str), layout
    config, names = layout
    known = set(FineGrainedFP8Config().to_dict())
    quantizer = Fp8Quantize(FineGrainedFP8HfQuantizer(FineGrainedFP8Config(
        **{k: v for k, v in config.items() if k in known and k not in ("quant_method", "dequantize")})))
    index_file = staging / SAFE_INDEX
    index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.is_file() else None
    shards = sorted(set(index["weight_map"].values())) if index else [SAFE_SINGLE]
    total = 0
    for shard in shards:
        scales, size = _rewrite(staging / shard, names, quantizer)
        total += size
        if index:
            index["weight_map"].update({s: shard for s in scales})
    if index:
        index["metadata"]["total_size"] = total
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        index_file.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return config


def _rewrite(path: Path, names: dict[str, tuple[int, int]], quantizer: Any) -> tuple[list[str], int]:
    """One shard rewritten with `names` quantized; returns the scale tensors it gained and its data size."""
    tensors = read_header(path, path.name)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        metadata = json.loads(f.read(size)).get("__metadata__")
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset, plan, scales = 0, [], []
    for name, (dtype, shape, start) in sorted(tensors.items(), key=lambda kv: kv[1][2]):
        block = names.get(name)
        if block is None or dtype not in _NAMES.values() or len(shape) < 2:
            nbytes = math.prod(shape) * torch.empty((), dtype=_dtype(dtype)).element_size()
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            plan.append((name, dtype, shape, start, None))
            continue
        grid = [*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1])]
        header[name] = {"dtype": "F8_E4M3", "shape": list(shape), "data_offsets": [offset, offset + math.prod(shape)]}
        offset += math.prod(shape)
        scale = f"{name}_scale_inv"
        header[scale] = {"dtype": "F32", "shape": grid, "data_offsets": [offset, offset + 4 * math.prod(grid)]}
        offset += 4 * math.prod(grid)
        scales.append(scale)
        plan.append((name, dtype, shape, start, block))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    temporary = path.with_name(path.name + ".fp8")
    with open(path, "rb") as source, open(temporary, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, shape, start, block in plan:
            if block is None:
                _copy(source, out, start, math.prod(shape) * torch.empty((), dtype=_dtype(dtype)).element_size())
                continue
            parts = []
            for values in _bands(source, start, _dtype(dtype), shape, block):
                q, s = _quantize(values, block, quantizer)
                out.write(q.reshape(-1).view(torch.uint8).numpy().tobytes())
                parts.append(s)
            out.write(torch.cat(parts).contiguous().numpy().tobytes())  # bands of whole block rows: in order
    os.replace(temporary, path)
    return scales, offset


def _dtype(name: str) -> torch.dtype:
    dtype = stored_dtype(name)
    assert dtype is not None, name  # the output's own shards: dtypes ame-hf wrote
    return dtype


def _copy(source: Any, out: Any, start: int, nbytes: int) -> None:
    source.seek(start)
    while nbytes:
        chunk = source.read(min(nbytes, 1 << 24))
        out.write(chunk)
        nbytes -= len(chunk)


def _bands(source: Any, start: int, dtype: torch.dtype, shape: tuple[int, ...], block: tuple[int, int]):
    """The tensor at `start` as bands of whole block rows (a 2-D matrix) or of whole matrices (a stack)."""
    unit = block[0] if len(shape) == 2 else 1  # rows of the first dimension in one band unit
    row = math.prod(shape[1:])
    step = max(1, _BAND_ELEMENTS // (unit * row)) * unit
    for first in range(0, shape[0], step):
        rows = min(step, shape[0] - first)
        source.seek(start + first * row * dtype.itemsize)
        buffer = bytearray(source.read(rows * row * dtype.itemsize))
        yield torch.frombuffer(buffer, dtype=dtype).reshape(rows, *shape[1:])


def _quantize(values: torch.Tensor, block: tuple[int, int], quantizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `Fp8Quantize` of `values` (zero-padded to whole blocks, which changes no block's maximum)."""
    rows, cols = values.shape[-2:]
    pad_rows, pad_cols = -rows % block[0], -cols % block[1]
    padded = torch.nn.functional.pad(values, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else values
    out = quantizer._quantize_one("x.weight", padded)
    return out["x.weight"][..., :rows, :cols].contiguous(), out["x.weight_scale_inv"].to(torch.float32)
