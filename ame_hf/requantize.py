"""A merge of quantized ingredients written back in their format. FP8 (`dtype="float8_e4m3fn"`): every tensor an
FP8 ingredient stores quantized is quantized again with the same block layout, its scales computed per block by
transformers' own quantizing op (`Fp8Quantize`). MXFP4 (`dtype="mxfp4"`): every expert tensor an MXFP4 ingredient
stores as `*_blocks` / `*_scales` is written so again (`mxfp4_quantize`). Shard by shard of the finished output,
one band of block rows (or of experts) at a time."""

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
from .config import QUANTIZED_OUTPUT_DTYPES
from .errors import IncompatibleCheckpointsError

FP8_OUTPUT, MXFP4_OUTPUT = QUANTIZED_OUTPUT_DTYPES
_METHODS = {FP8_OUTPUT: "fp8", MXFP4_OUTPUT: "mxfp4"}  # the output dtype -> the quant_method it writes back
_BAND_ELEMENTS = 1 << 22  # elements quantized at once (whole bands of block rows: no cut inside a block)
_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def quantized_layout(dtype: str, checkpoints: Sequence[Any]) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """The layout the output takes from its ingredients quantized as `dtype` asks: (their `quantization_config`,
    output name -> its FP8 block, or None for an MXFP4 expert tensor), or why there is none (no such ingredient,
    one FP8 scale per tensor, ingredients whose layouts differ).

    Args:
        dtype: `float8_e4m3fn` or `mxfp4`.
        checkpoints: the ingredients as the report sees them (under the output's names).

    Returns:
        The layout, or the reason as one line.
    """
    method = _METHODS[dtype]
    configs, names = [], {}
    for ckpt in checkpoints:
        quantized = getattr(ckpt, "dequantized", None) or {}
        mine = {n: quantized[s] for n, s in ckpt.stored.items() if s in quantized and quantized[s].method == method}
        if not mine:
            continue
        blocks = {q.block for q in mine.values()}
        if method == "fp8" and None in blocks:
            return f"dtype={FP8_OUTPUT!r}: {ckpt.name} has one FP8 scale per tensor; ame-hf re-quantizes block-scaled FP8 only"
        configs.append((ckpt.name, ckpt.config["quantization_config"]))
        names.update({n: q.block for n, q in mine.items()})
    if not configs:
        what = "FP8 (quantization_config.quant_method fp8)" if method == "fp8" else "MXFP4 (quant_method mxfp4)"
        return (f"dtype={dtype!r} writes the merge in its {method.upper()} ingredients' format, but no ingredient is "
                f"{what}; choose auto, float32, bfloat16 or float16")
    layouts = {json.dumps(_layout(c), sort_keys=True) for _, c in configs}
    if len(layouts) > 1:
        return (f"dtype={dtype!r}: the {method.upper()} ingredients differ in their layout ("
                + "; ".join(f"{n}: {_layout(c)}" for n, c in configs) + "); choose auto to write the merge dequantized")
    return dict(configs[0][1]), names


def quantized_output_check(config: Any, checkpoints: Sequence[Any]) -> None:
    """Before a download: an FP8 output needs FP8 ingredients of one block layout, an MXFP4 output MXFP4 ingredients
    of one `quantization_config`.

    Args:
        config: the run's `AmeConfig`.
        checkpoints: the ingredients as the report sees them.

    Raises:
        IncompatibleCheckpointsError: `dtype` is float8_e4m3fn or mxfp4 and there is no such layout (one line
            saying why).
    """
    if config.dtype in _METHODS:
        layout = quantized_layout(config.dtype, checkpoints)
        if isinstance(layout, str):
            raise IncompatibleCheckpointsError(layout, fields=("dtype",))


def _layout(config: dict[str, Any]) -> dict[str, Any]:
    if config.get("quant_method") == "mxfp4":
        return {k: v for k, v in config.items() if k != "dequantize"}
    return {k: config.get(k) for k in ("weight_block_size", "scale_fmt", "activation_scheme")}


def card_text(dtype: str, checkpoints: Sequence[Any]) -> str:
    """What the card says of the output dtype of an FP8 or MXFP4 output.

    >>> card_text("float8_e4m3fn", report.checkpoints)  # doctest: +SKIP
    'float8_e4m3fn as its FP8 ingredients (252 tensors in 128x128 blocks, ...)'
    """
    layout = quantized_layout(dtype, checkpoints)
    if isinstance(layout, str):
        return dtype
    config, names = layout
    if dtype == MXFP4_OUTPUT:
        return (f"{MXFP4_OUTPUT} as its MXFP4 ingredients ({len(names)} expert tensors as *_blocks, two e2m1 values "
                "a byte, and *_scales, an e8m0 exponent per 32 values: each the smallest power of two under which "
                "none of its 32 merged values exceeds 6, each value rounded to the nearest e2m1 value, ties to even; "
                "the other tensors in the ingredients' dtype)")
    rows, cols = config["weight_block_size"]
    return (f"{FP8_OUTPUT} as its FP8 ingredients ({len(names)} tensors in {rows}x{cols} blocks, each block's "
            "weight_scale_inv computed from the merged values by transformers' Fp8Quantize; the other tensors in "
            "the ingredients' dtype)")


def requantize(staging: Path, checkpoints: Sequence[Any], dtype: str) -> dict[str, Any]:
    """Rewrite the finished output's shards in `staging` with its FP8 (or MXFP4) tensors quantized (each shard
    written beside itself, then moved over it), and its index with the new tensors. Memory: one band at a time.

    Args:
        staging: the staging directory, its shards (and index) written dequantized.
        checkpoints: the ingredients as the report sees them.
        dtype: `float8_e4m3fn` or `mxfp4`.

    Returns:
        The `quantization_config` the output's config takes.
    """
    layout = quantized_layout(dtype, checkpoints)
    assert not isinstance(layout, str), layout
    config, names = layout
    quantizer = _fp8_quantizer(config) if dtype == FP8_OUTPUT else None
    index_file = staging / SAFE_INDEX
    index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.is_file() else None
    shards = sorted(set(index["weight_map"].values())) if index else [SAFE_SINGLE]
    total = 0
    for shard in shards:
        added, removed, size = _rewrite(staging / shard, names, quantizer)
        total += size
        if index:
            for name in removed:
                del index["weight_map"][name]
            index["weight_map"].update({s: shard for s in added})
    if index:
        index["metadata"]["total_size"] = total
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        index_file.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return config


def _fp8_quantizer(config: dict[str, Any]) -> Any:
    """transformers' `Fp8Quantize` for an FP8 `quantization_config`."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    known = set(FineGrainedFP8Config().to_dict())
    return Fp8Quantize(FineGrainedFP8HfQuantizer(FineGrainedFP8Config(
        **{k: v for k, v in config.items() if k in known and k not in ("quant_method", "dequantize")})))


def _rewrite(path: Path, names: dict[str, Any], quantizer: Any) -> tuple[list[str], list[str], int]:
    """One shard rewritten with `names` quantized (FP8 with `quantizer`, else MXFP4); returns the tensors it gained
    and lost (by name) and its data size."""
    tensors = read_header(path, path.name)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        metadata = json.loads(f.read(size)).get("__metadata__")
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset, plan, added, removed = 0, [], [], []
    for name, (dtype, shape, start) in sorted(tensors.items(), key=lambda kv: kv[1][2]):
        block = names.get(name)
        if quantizer is None and name in names and dtype in _NAMES.values() and len(shape) == 3 and shape[1] % 32 == 0:
            # MXFP4: (experts, in, out) as loaded, stored (experts, out, in / 32, 16) and (experts, out, in / 32)
            experts, inputs, outputs = shape
            for part, grid in (("_blocks", [experts, outputs, inputs // 32, 16]),
                               ("_scales", [experts, outputs, inputs // 32])):
                header[name + part] = {"dtype": "U8", "shape": grid, "data_offsets": [offset, offset + math.prod(grid)]}
                offset += math.prod(grid)
                added.append(name + part)
            removed.append(name)
            plan.append((name, dtype, shape, start, "mxfp4"))
            continue
        if block is None or quantizer is None or dtype not in _NAMES.values() or len(shape) < 2:
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
        added.append(scale)
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
            for values in _bands(source, start, _dtype(dtype), shape, (1, 1) if block == "mxfp4" else block):
                if block == "mxfp4":  # (experts, in, out) -> groups of 32 inputs per output row
                    q, s = mxfp4_quantize(values.float().transpose(1, 2).reshape(len(values), shape[2], -1, 32))
                else:
                    q, s = _quantize(values, block, quantizer)
                out.write(q.reshape(-1).view(torch.uint8).numpy().tobytes())
                parts.append(s)
            out.write(torch.cat(parts).contiguous().numpy().tobytes())  # bands of whole block rows: in order
    os.replace(temporary, path)
    return added, removed, offset


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


# The midpoints between neighbouring e2m1 magnitudes (codes 0-7: 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign), and
# whether a value exactly there rounds up: it does above an odd code (0.5, 1.5, 3), to the even one (ties to even).
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def mxfp4_quantize(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 (OCP Microscaling) of groups of 32 values: per group an e8m0 scale `2**k`, the smallest under which
    none of its values exceeds 6 (the largest e2m1 value: nothing saturates), and each value divided by it (exactly:
    a power of two) rounded to the nearest e2m1 value, ties to even. Packed as transformers' gpt-oss loader
    (`convert_moe_packed_tensors`) unpacks it: value `2j` in the low nibble of byte `j`, `2j + 1` in the high one,
    the scale as the byte `k + 127`. Values that come from MXFP4 (a merge of equal ingredients) give those values
    back exactly.

    Args:
        groups: float32 values, shape `(..., 32)`.

    Returns:
        (the packed codes, uint8 of shape `(..., 16)`; the scales, uint8 of shape `(...)`).

    >>> codes, scales = mxfp4_quantize(torch.tensor([[6.0, -1.0, 0.75, 0.0] + [0.0] * 28]))
    >>> codes[0, :2].tolist(), scales.tolist()  # 6 (code 7) | -1 (code 10) << 4; 0.75 (a tie: to 1.0, code 2) | 0
    ([167, 2], [127])
    """
    groups = groups.contiguous()
    amax = groups.abs().amax(-1)
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2**exponent, mantissa in [0.5, 1)
    k = torch.where(mantissa <= 0.75, exponent - 3, exponent - 2)  # 6 * 2**k >= amax > 6 * 2**(k - 1)
    k = torch.where(amax == 0, -127, k).clamp(-127, 127)
    scaled = (groups * _power_of_two(-k).unsqueeze(-1)).abs_()  # exact (but where it underflows: to code 0 anyway)
    codes = torch.signbit(groups).to(torch.uint8).mul_(8)
    above = torch.empty(scaled.shape, dtype=torch.bool, device=scaled.device)
    # The code is how many midpoints lie below the value: 7 compares, 3 times as fast as torch.bucketize here.
    for midpoint, up in _MIDPOINTS:
        codes += torch.ge(scaled, midpoint, out=above) if up else torch.gt(scaled, midpoint, out=above)
    return codes[..., 0::2] | codes[..., 1::2] << 4, (k + 127).to(torch.uint8)


def _power_of_two(n: torch.Tensor) -> torch.Tensor:
    """`2.0 ** n` in float32, exactly, from its bits (`n` in [-127, 127]; 2**-127 is subnormal).

    >>> _power_of_two(torch.tensor([-127, -1, 0, 127])).tolist() == [2.0 ** -127, 0.5, 1.0, 2.0 ** 127]
    True
    """
    n = n.to(torch.int32)
    return torch.where(n >= -126, (n + 127) << 23, torch.full_like(n, 1 << 22)).view(torch.float32)
