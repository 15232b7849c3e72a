"""The weight files of a model folder, read as data: which files hold the weights (safetensors first, a variant's
names, an index's shards, none pointing outside the folder) and each safetensors header, validated. No torch."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from .errors import CheckpointError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def with_variant(file: str, variant: str | None) -> str:
    """transformers' variant naming: `model.safetensors` -> `model.fp16.safetensors`,
    `model.safetensors.index.json` -> `model.safetensors.index.fp16.json`.

    Args:
        file: a weight file's standard name.
        variant: the variant, or None.

    Returns:
        The variant's file name (`file` itself without a variant).

    >>> with_variant(SAFE_INDEX, "fp16")
    'model.safetensors.index.fp16.json'
    """
    if not variant:
        return file
    stem, dot, suffix = file.rpartition(".")
    return f"{stem}.{variant}{dot}{suffix}"


def weight_layout(files: set[str], variant: str | None = None) -> tuple[str, str | None, str | None]:
    """Which weight files a model's file list holds: (`safetensors` | `bin`, index file or None,
    single file or None). Safetensors first; `.bin` only when there is none.

    Args:
        files: the file names of a model folder or repo.
        variant: the weights variant to look for.

    Returns:
        The format, the index file or None, the single file or None.

    Raises:
        CheckpointError: no weights under these names (naming the variants that do exist, if any: `variant`).

    >>> weight_layout({"config.json", "model.safetensors", "pytorch_model.bin"})
    ('safetensors', None, 'model.safetensors')
    """
    for kind, single, index in (("safetensors", SAFE_SINGLE, SAFE_INDEX), ("bin", BIN_SINGLE, BIN_INDEX)):
        if with_variant(index, variant) in files:
            return kind, with_variant(index, variant), None
        if with_variant(single, variant) in files:
            return kind, None, with_variant(single, variant)
    wanted = f" of variant {variant!r}" if variant else ""
    others = sorted({f.split(".")[1] for f in files if f.count(".") >= 2 and f.startswith(("model.", "pytorch_model."))
                     and f.endswith((".safetensors", ".bin")) and "-of-" not in f})
    hint = f"; this model has the variant(s) {', '.join(others)}: pass variant=NAME" if others else ""
    gguf = sorted(f for f in files if f.endswith(".gguf"))
    if gguf and not others:  # llama.cpp's quantized files: say what to merge instead
        hint = (f"; it holds GGUF weights ({gguf[0]}{', ...' if len(gguf) > 1 else ''}), quantized for llama.cpp, "
                "which ame-hf does not merge: merge the safetensors originals, then convert the merge to GGUF")
    raise CheckpointError(f"no weights{wanted} found (expected {with_variant(SAFE_SINGLE, variant)}, "
                          f"{with_variant(SAFE_INDEX, variant)}, {with_variant(BIN_SINGLE, variant)} or "
                          f"{with_variant(BIN_INDEX, variant)}){hint}", fields=("variant",) if others else ())


def index_shards(index_file: Path, name: str) -> list[str]:
    """The shard files a `*.index.json` names (validated: none may point outside its directory).

    Args:
        index_file: the index.
        name: the checkpoint's name, for messages.

    Returns:
        The shard file names, sorted.

    Raises:
        CheckpointError: the index cannot be read, has no `weight_map`, or names an unsafe shard.
    """
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{name}: {index_file.name} is not a valid index ({err})", path=index_file.parent) from err
    return sorted({_safe_shard_name(f, index_file) for f in weight_map.values()})


def _safe_shard_name(name: Any, index_file: Path) -> str:
    # Shard names come from a downloaded file: never let one point outside the directory.
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..")
            or name.startswith("..") or os.path.isabs(name)):
        raise CheckpointError(f"{index_file} names an invalid shard file {name!r}; the index is corrupt or unsafe",
                              path=index_file.parent)
    return name


# Bytes per element of every safetensors dtype (also those torch cannot average here), to validate a header.
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def read_header(file: Path, name: str) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """Every tensor of a safetensors file as (dtype name, shape, absolute byte offset of its data), from one
    read and one parse of its header, validated as safetensors validates it (offsets contiguous, sizes
    matching shapes and dtypes, the file exactly as long as the header says).

    Args:
        file: a safetensors file.
        name: the checkpoint's name, for messages.

    Returns:
        Tensor name -> (dtype name, shape, data offset); `__metadata__` is left out.

    Raises:
        CheckpointError: not a valid safetensors file (naming `name` and the file).
    """
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{name}: {file.name} is not a valid safetensors file ({why}); re-download or "
                               "re-save it", path=file.parent)

    try:
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad("shorter than its 8-byte header length")
            (size,) = struct.unpack("<Q", prefix)
            if size > _MAX_HEADER:
                raise bad(f"header of {size} bytes")
            raw = f.read(size)
            length = os.fstat(f.fileno()).st_size
        header = json.loads(raw) if len(raw) == size else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(str(err)) from err
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    out: dict[str, tuple[str, tuple[int, ...], int]] = {}
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {key!r} has no dtype, shape and data_offsets") from None
        if (dtype not in _ITEM_BYTES or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not (isinstance(begin, int) and isinstance(end, int))):
            raise bad(f"tensor {key!r} has dtype {dtype!r}, shape {list(shape)}")
        numel = math.prod(shape)
        if end - begin != numel * _ITEM_BYTES[dtype]:
            raise bad(f"tensor {key!r} spans {end - begin} bytes, not the {numel * _ITEM_BYTES[dtype]} its shape needs")
        spans.append((begin, end))
        out[key] = (dtype, shape, 8 + size + begin)
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise bad("its tensors' data overlap or leave gaps")
        position = end
    if 8 + size + position != length:
        raise bad(f"{length} bytes where its header describes {8 + size + position}")
    return out
