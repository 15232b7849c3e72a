"""FP8 (block-scaled `float8_e4m3fn` + `weight_scale_inv`) and MXFP4 (`*_blocks` + `*_scales`) checkpoints seen as
the full-precision tensors transformers loads from them with dequantization, read block by block of rows.

The arithmetic is transformers' own (`Fp8Dequantize._dequantize_one`, `convert_moe_packed_tensors`), applied to the
rows a block asks for: every output element is the same product of one stored value and its block's scale, in the
dtype the model loads in, so nothing depends on where a block starts. Other quantization methods are refused by name.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

MERGED_METHODS = ("fp8", "mxfp4")
# safetensors dtypes torch holds but cannot average: read as stored, only to be dequantized.
STORED_ONLY = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}
QUANTIZED_HINT = ("AME averages full-precision weights: merge the unquantized originals (e.g. the fine-tune's "
                  "float16/bfloat16 release), then quantize the merge (FP8 and MXFP4 checkpoints merge as they are)")
_FP8_DROPPED = ("activation_scale", "input_scale")  # static activation scales: no parameter of the dequantized model


@dataclass(frozen=True)
class Quantized:
    """One tensor of the loaded model that a checkpoint stores quantized.

    Attributes:
        method: `fp8` or `mxfp4`.
        values: the stored name of its quantized values (`...weight`, `..._blocks`).
        scales: the stored name of its scales (`...weight_scale_inv`, `..._scales`).
        values_info: where the values lie (a `TensorInfo`).
        scales_info: where the scales lie.
        dtype: the dtype the model loads it in.
        block: FP8's `weight_block_size` (rows, columns); None: one scale per tensor (or MXFP4).
    """

    method: str
    values: str
    scales: str
    values_info: Any
    scales_info: Any
    dtype: torch.dtype
    block: tuple[int, int] | None = None


def quant_method(config: dict[str, Any]) -> str | None:
    """The `quant_method` of a config's `quantization_config` (None: not quantized).

    >>> quant_method({"quantization_config": {"quant_method": "fp8"}}), quant_method({})
    ('fp8', None)
    """
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        return None
    return str(quant.get("quant_method") or quant.get("quant_type") or "an unnamed method")


def quantization_refusal(name: str, config: dict[str, Any]) -> str | None:
    """Why `config.json` alone refuses a quantized checkpoint (a method other than FP8 or MXFP4, an FP8 layout
    transformers does not dequantize, a transformers without the functions), or None.

    >>> quantization_refusal("org/m", {"quantization_config": {"quant_method": "gptq", "bits": 4}})[:36]
    'org/m is quantized with gptq (quanti'
    >>> quantization_refusal("org/m", {"quantization_config": {"quant_method": "fp8"}}) is None
    True
    """
    method = quant_method(config)
    if method is None:
        return None
    if method not in MERGED_METHODS:
        return f"{name} is quantized with {method} (quantization_config); {QUANTIZED_HINT}"
    quant = config["quantization_config"]
    if method == "fp8":
        block = quant.get("weight_block_size")
        if block is not None and not (isinstance(block, (list, tuple)) and len(block) == 2
                                      and all(isinstance(b, int) and b > 0 for b in block)):
            return f"{name}: quantization_config.weight_block_size is {block!r}, not two positive whole numbers"
        if quant.get("modules_to_convert"):
            return (f"{name}: quantization_config.modules_to_convert keeps FP8 embeddings quantized even when "
                    "transformers dequantizes; merge a bfloat16 copy of it")
    try:
        _functions(method)
    except ImportError as err:
        return f"{name} is quantized with {method}, which this transformers cannot dequantize ({err}); upgrade transformers"
    return None


def _functions(method: str) -> Any:
    """transformers' own dequantization for `method`, from where transformers defines it."""
    if method == "fp8":
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize

        return Fp8Dequantize(None)._dequantize_one
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors


def load_dtype(ckpt: Any) -> torch.dtype:
    """The dtype transformers loads a quantized checkpoint's dequantized tensors in: its config's `dtype`, else that
    of its unquantized floating tensors (as transformers derives it from the weights), else bfloat16."""
    for key in ("dtype", "torch_dtype"):
        value = ckpt.config.get(key)
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            return getattr(torch, value)
    floats = [i.dtype for k, i in ckpt.tensors.items() if i.dtype.is_floating_point and not k.endswith("scale_inv")]
    return max(set(floats), key=floats.count) if floats else torch.bfloat16


def dequantized_view(ckpt: Any) -> None:
    """Replace (in place) a quantized checkpoint's stored values and scales by the tensors transformers loads from
    them (`ckpt.dequantized`: name -> `Quantized`); an unsupported layout goes to `ckpt.refusals`, by name.

    >>> dequantized_view(Checkpoint("./qwen3-8b-fp8"))  # doctest: +SKIP
    """
    method = quant_method(ckpt.config)
    if method not in MERGED_METHODS or quantization_refusal(ckpt.name, ckpt.config) is not None:
        return
    dtype, quantized = load_dtype(ckpt), {}
    stored = {**ckpt.raw, **ckpt.tensors}
    if method == "fp8":
        block = ckpt.config["quantization_config"].get("weight_block_size")
        block = tuple(block) if block else None
        for key, info in sorted(stored.items()):
            scale = key + "_scale_inv"  # transformers' names: `x.weight_scale_inv`, a fused `x.gate_up_proj_scale_inv`
            if scale not in stored or info.dtype not in _FP8_VALUES:
                continue
            why = _fp8_layout(info.shape, stored[scale].shape, block)
            if why:
                ckpt.refusals = [*getattr(ckpt, "refusals", ()), f"{ckpt.name}: {key} {why}"]
                continue
            quantized[key] = Quantized("fp8", key, scale, info, stored[scale], dtype, block)
        owners = {q.values.rsplit(".", 1)[0] for q in quantized.values()}
        dropped = {q.scales for q in quantized.values()} | {f"{o}.{s}" for o in owners for s in _FP8_DROPPED}
    else:
        for key, info in sorted(stored.items()):
            base = key.removesuffix("_blocks")
            scales = stored.get(f"{base}_scales")
            if key == base or scales is None or info.dtype != torch.uint8 or scales.dtype != torch.uint8:
                continue
            if len(info.shape) != 4 or tuple(scales.shape) != tuple(info.shape[:-1]):
                ckpt.refusals = [*getattr(ckpt, "refusals", ()), f"{ckpt.name}: {key} has shape {list(info.shape)} "
                                 f"and its scales {list(scales.shape)}, not the (experts, rows, groups, 16) MXFP4 "
                                 "layout transformers dequantizes"]
                continue
            quantized[base] = Quantized("mxfp4", key, f"{base}_scales", info, scales, dtype)
        dropped = {n for q in quantized.values() for n in (q.values, q.scales)}
    for name, q in quantized.items():
        shape = q.values_info.shape
        if method == "mxfp4":  # (experts, rows, groups, 16 bytes) -> (experts, groups * 32, rows), as transformers
            shape = (shape[0], shape[2] * shape[3] * 2, shape[1])
        ckpt.tensors[name] = dataclasses.replace(q.values_info, shape=tuple(shape), dtype=dtype, offset=-1)
        ckpt.stored[name] = name
    for name in dropped - set(quantized):
        for table in (ckpt.tensors, ckpt.stored, ckpt.unsupported, ckpt.raw):
            table.pop(name, None)
    for name in quantized:
        ckpt.unsupported.pop(name, None)
    ckpt.dequantized = quantized


_FP8_VALUES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _fp8_layout(shape: tuple[int, ...], scale: tuple[int, ...], block: tuple[int, int] | None) -> str | None:
    """Why FP8 values of `shape` and scales of shape `scale` are no layout transformers dequantizes, or None."""
    if len(shape) < 2:
        return f"has shape {list(shape)}: FP8 weights are matrices (or stacks of them)"
    if block is None:
        return None if math.prod(scale) == 1 else f"has scales of shape {list(scale)} but no weight_block_size"
    grid = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    return None if tuple(scale) == grid else (f"has scales of shape {list(scale)}, not the {list(grid)} its "
                                              f"{block[0]}x{block[1]} blocks need")


def read_dequantized(ckpt: Any, q: Quantized, rows: tuple[int, int] | None) -> torch.Tensor:
    """Rows `[start, stop)` (of the first dimension) of a quantized tensor as transformers loads it: only those rows
    of the values and their scales are read.

    Args:
        ckpt: the checkpoint that stores it.
        q: the tensor.
        rows: the rows, or None for all.

    Returns:
        The dequantized rows, in the dtype the model loads in (`q.dtype`).
    """
    out_dtype = q.dtype
    values_shape = q.values_info.shape
    start, stop = rows if rows is not None else (0, values_shape[0])
    values = _stored_rows(ckpt, q.values, q.values_info, (start, stop))
    if q.method == "mxfp4":
        scales = _stored_rows(ckpt, q.scales, q.scales_info, (start, stop))
        return _functions("mxfp4")(values, scales, dtype=out_dtype)
    if q.block is None:  # one scale for the tensor: a grid of one block
        scales = _stored_rows(ckpt, q.scales, q.scales_info, None).reshape(1, 1)
        return _functions("fp8")(values, scales, output_dtype=out_dtype)
    block_rows, block_cols = q.block
    if len(values_shape) == 2:  # rows of the matrix: the rows of scales that cover them, one scale row per row
        first = start // block_rows
        scales = _stored_rows(ckpt, q.scales, q.scales_info, (first, -(-stop // block_rows)))
        scales = scales.repeat_interleave(block_rows, dim=0)[start - first * block_rows:stop - first * block_rows]
    else:  # rows of a stack of matrices: whole matrices
        scales = _stored_rows(ckpt, q.scales, q.scales_info, (start, stop))
        scales = scales.repeat_interleave(block_rows, dim=-2)[..., :values_shape[-2], :]
    if values_shape[-1] % block_cols:  # a partial last block of columns: one scale per column
        scales = scales.repeat_interleave(block_cols, dim=-1)[..., :values_shape[-1]]
    # transformers derives the block from the grid it is given: a grid of one row per row (and block_cols columns
    # per scale) is the checkpoint's own blocks, wherever these rows start.
    return _functions("fp8")(values, scales, output_dtype=out_dtype)


def _stored_rows(ckpt: Any, name: str, info: Any, rows: tuple[int, int] | None) -> torch.Tensor:
    """Rows of a tensor as stored (any dtype, FP8 too), read as `Checkpoint.read` reads: by offset, else safetensors."""
    if rows is not None and not info.shape:
        rows = None
    ckpt.reads.add(info.nbytes * (rows[1] - rows[0]) // info.shape[0] if rows is not None else info.nbytes)
    if ckpt._bin is not None:
        t = ckpt._bin[name]
        return (t if rows is None else t[rows[0]:rows[1]]).clone()
    if sys.byteorder == "little" and info.offset >= 0:
        return ckpt._read_at(name, info, rows, info.dtype)
    from safetensors import safe_open

    with safe_open(ckpt.path / info.file, framework="pt") as handle:
        return (handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows[0]:rows[1]]).clone()


def describe(ckpt: Any) -> str | None:
    """The one line `check` says about a quantized checkpoint it merges, or None.

    >>> describe(Checkpoint("./qwen3-8b-fp8"))  # doctest: +SKIP
    'org/qwen3-8b-fp8 is FP8 (float8_e4m3fn, 128x128 blocks, 252 tensors): dequantized to bfloat16 as ...'
    """
    quantized = getattr(ckpt, "dequantized", None)
    if not quantized:
        return None
    first = next(iter(quantized.values()))
    dtype = str(first.dtype).removeprefix("torch.")
    if first.method == "fp8":
        layout = f"{first.block[0]}x{first.block[1]} blocks" if first.block else "one scale per tensor"
        what = f"FP8 ({str(first.values_info.dtype).removeprefix('torch.')}, {layout}, {len(quantized)} tensors)"
    else:
        what = f"MXFP4 (4-bit e2m1 values, an e8m0 scale per 32, {len(quantized)} expert tensors)"
    return (f"{ckpt.name} is {what}: dequantized to {dtype} as transformers loads it (dequantize=True), "
            "block by block of rows")
