"""`Checkpoint`: a lazy, read-only view over one model directory's weights and config.

Each safetensors header is read and validated once (`read_header`); tensors (or slices of rows) are then
read with one positioned read each into a fresh tensor; `.bin` only via `weights_only`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._model_files import read_config
from ._saved_layout import to_saved_layout
from .errors import CheckpointError, IngredientNotFoundError

logger = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def with_variant(file: str, variant: str | None) -> str:
    """transformers' variant naming: `model.safetensors` -> `model.fp16.safetensors`,
    `model.safetensors.index.json` -> `model.safetensors.index.fp16.json`."""
    if not variant:
        return file
    stem, dot, suffix = file.rpartition(".")
    return f"{stem}.{variant}{dot}{suffix}"


def weight_layout(files: set[str], variant: str | None = None) -> tuple[str, str | None, str | None]:
    """Which weight files a model's file list holds: (`safetensors` | `bin`, index file or None,
    single file or None). Safetensors first; `.bin` only when there is none.

    Raises:
        CheckpointError: no weights under these names (naming the variants that do exist, if any).
    """
    for kind, single, index in (("safetensors", SAFE_SINGLE, SAFE_INDEX), ("bin", BIN_SINGLE, BIN_INDEX)):
        if with_variant(index, variant) in files:
            return kind, with_variant(index, variant), None
        if with_variant(single, variant) in files:
            return kind, None, with_variant(single, variant)
    wanted = f" of variant {variant!r}" if variant else ""
    others = sorted({f.split(".")[1] for f in files if f.count(".") >= 2 and f.startswith(("model.", "pytorch_model."))
                     and f.endswith((".safetensors", ".bin")) and "-of-" not in f})
    hint = f"; this model has the variant(s) {', '.join(others)}: pass --variant NAME" if others else ""
    raise CheckpointError(f"no weights{wanted} found (expected {with_variant(SAFE_SINGLE, variant)}, "
                          f"{with_variant(SAFE_INDEX, variant)}, {with_variant(BIN_SINGLE, variant)} or "
                          f"{with_variant(BIN_INDEX, variant)}){hint}")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_from_name(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name (`F32`, `BF16`, ...); None for FP8 and other quantized ones."""
    return _DTYPES.get(name)


def index_shards(index_file: Path, name: str) -> list[str]:
    """The shard files a `*.index.json` names (validated: none may point outside its directory)."""
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{name}: {index_file.name} is not a valid index ({err})", path=index_file.parent) from err
    return sorted({_safe_shard_name(f, index_file) for f in weight_map.values()})


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it looks like, without reading it."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = -1  # byte offset of the data in a safetensors file (-1: not known)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _safe_shard_name(name: Any, index_file: Path) -> str:
    # Shard names come from a downloaded file: never let one point outside the directory.
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..")
            or name.startswith("..") or os.path.isabs(name)):
        raise CheckpointError(f"{index_file} names an invalid shard file {name!r}; the index is corrupt or unsafe",
                              path=index_file.parent)
    return name


class ReadCount:
    """Bytes of tensor data read from a checkpoint's files (shared by its renamed views), so that the
    read-once property of a merge can be measured and tested."""

    def __init__(self) -> None:
        self.bytes = 0

    def add(self, nbytes: int) -> None:
        self.bytes += nbytes


class Checkpoint:
    """Lazy view over the weights of one model directory.

    Args:
        path: a directory with `model.safetensors`, a sharded `model.safetensors.index.json`,
            or (only when there is no safetensors) `pytorch_model.bin[.index.json]`.
        name: how to call this checkpoint in messages (the user's reference).

    >>> ckpt = Checkpoint("./my-model")                     # doctest: +SKIP
    >>> ckpt.names()[:2], ckpt.read("lm_head.weight").shape  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None, *, variant: str | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.name = name or str(path)
        self.variant = variant
        self.reads = ReadCount()
        self.header_only = False
        if not self.path.is_dir():
            raise IngredientNotFoundError(f"{self.name}: no such directory {self.path}", ref=self.name)
        # The input stage passes the config it already read: each config.json is parsed once a run.
        self.config = config if config is not None else read_config(self.path, self.name)
        self._bin: dict[str, torch.Tensor] | None = None
        # Tensors in dtypes torch cannot hold here (FP8 and other quantized formats): name -> dtype.
        self.unsupported: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = self._scan()
        self.stored: dict[str, str] = {n: n for n in self.tensors}  # name -> name in the file
        to_saved_layout(self)  # fused MoE experts and the like: under the names save_pretrained writes
        if not self.tensors and not self.unsupported:
            raise CheckpointError(f"{self.name}: the weights contain no tensors", path=self.path)

    @classmethod
    def from_header(cls, name: str, config: dict[str, Any], tensors: dict[str, TensorInfo],
                    unsupported: dict[str, str] | None = None, path: Path | None = None) -> "Checkpoint":
        """A checkpoint known only by its config and safetensors headers (read from the Hub with range
        requests): enough to check it, not to read it."""
        ckpt = cls.__new__(cls)
        ckpt.path, ckpt.name, ckpt.variant, ckpt.config = path, name, None, config
        ckpt.header_only = True
        ckpt._bin, ckpt.unsupported, ckpt.tensors = None, dict(unsupported or {}), dict(tensors)
        ckpt.stored = {n: n for n in tensors}
        ckpt.reads = ReadCount()
        ckpt.format, ckpt.files = "safetensors", sorted({t.file for t in tensors.values()})
        to_saved_layout(ckpt)
        return ckpt

    def renamed(self, names: dict[str, str]) -> "Checkpoint":
        """The same files seen under other tensor names: `names` maps a new name to a stored one."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.tensors = {new: self.tensors[old] for new, old in names.items()}
        view.stored = {new: self.stored[old] for new, old in names.items()}
        return view

    # -- discovery ----------------------------------------------------------------------------
    def _weight_files(self) -> tuple[str, list[str]]:
        """("safetensors" | "bin", [file names])."""
        try:
            kind, index, single = weight_layout({p.name for p in self.path.iterdir()}, self.variant)
        except CheckpointError as err:
            raise CheckpointError(f"{self.name}: {err} in {self.path}", path=self.path) from err
        if index is not None:
            files = index_shards(self.path / index, self.name)
            for f in files:
                if not (self.path / f).is_file():
                    raise CheckpointError(
                        f"{self.name}: {index} names shard {f!r}, which is missing; re-download the checkpoint", path=self.path
                    )
            return kind, files
        assert single is not None
        return kind, [single]

    def _scan(self) -> dict[str, TensorInfo]:
        kind, files = self._weight_files()
        self.format = kind
        self.files = files
        tensors: dict[str, TensorInfo] = {}
        if kind == "bin":
            self._bin = {}
            for f in files:
                self._bin.update(self._load_bin(f))
            for key, t in self._bin.items():
                tensors[key] = TensorInfo(file="", shape=tuple(t.shape), dtype=t.dtype)
            return tensors
        for f in files:
            for key, (dtype_name, shape, offset) in read_header(self.path / f, self.name).items():
                dtype = _DTYPES.get(dtype_name)
                if dtype is None:
                    self.unsupported[key] = dtype_name
                    continue
                if key in tensors:
                    raise CheckpointError(f"{self.name}: tensor {key!r} appears in two shards", path=self.path, tensor=key)
                tensors[key] = TensorInfo(file=f, shape=shape, dtype=dtype, offset=offset)
        return tensors

    def same_tensors(self, checked: "Checkpoint") -> None:
        """After a download: the files hold exactly the tensors (names, shapes, dtypes) whose headers were checked.

        Raises:
            CheckpointError: they differ (the repo changed under the same commit, or the cache is corrupt).
        """
        mine = {n: (i.shape, i.dtype) for n, i in self.tensors.items()}
        theirs = {n: (i.shape, i.dtype) for n, i in checked.tensors.items()}
        if mine != theirs or self.unsupported != checked.unsupported:
            differ = sorted(set(mine) ^ set(theirs) | {n for n in set(mine) & set(theirs) if mine[n] != theirs[n]})
            raise CheckpointError(f"{self.name}: the downloaded weights differ from the headers that were checked "
                                  f"(e.g. {differ[:1] or sorted(self.unsupported)[:1]}); delete it from the Hub cache "
                                  "and run again", path=self.path)

    def _load_bin(self, file: str) -> dict[str, torch.Tensor]:
        try:
            # weights_only: a pickle from the Hub must never run code.
            state = torch.load(self.path / file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise CheckpointError(f"{self.name}: cannot load {file} safely ({str(err).splitlines()[0]})", path=self.path) from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{self.name}: {file} does not hold a flat state dict of tensors", path=self.path)
        return state

    # -- access -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in a stable (sorted) order."""
        return sorted(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh copy of one tensor, or of rows `[start, stop)` of its first dimension,
        optionally converted to `dtype` (in the same copy).

        Never a view of the memory map: safetensors may hand back shared memory, and the
        engine updates tensors in place.
        """
        info = self.tensors[name]
        dtype = dtype or info.dtype
        if self.path is None:
            raise CheckpointError(f"{self.name}: only its headers were read; download it to read {name!r}",
                                  tensor=name)
        self.reads.add(info.nbytes * (rows[1] - rows[0]) // info.shape[0] if rows is not None and info.shape
                       else info.nbytes)
        if self._bin is not None:
            t = self._bin[self.stored[name]]
            t = t if rows is None or not info.shape else t[rows[0]:rows[1]]
            return t.to(dtype, copy=True)
        if _LITTLE_ENDIAN and info.offset >= 0:
            return self._read_at(name, info, rows, dtype)
        from safetensors import safe_open

        try:
            # A handle per read: pages of the memory map are released when it closes, so the
            # resident memory stays bounded by the slice, not by everything read so far.
            with safe_open(self.path / info.file, framework="pt") as handle:
                if rows is None or not info.shape:
                    t = handle.get_tensor(self.stored[name])
                else:
                    t = handle.get_slice(self.stored[name])[rows[0]:rows[1]]
                return t.to(dtype, copy=True)
        except Exception as err:
            raise CheckpointError(f"{self.name}: cannot read tensor {name!r} from {info.file} ({err})", path=self.path, tensor=name) from err

    def _read_at(self, name: str, info: TensorInfo, rows: tuple[int, int] | None, dtype: torch.dtype) -> torch.Tensor:
        """Read the bytes at the tensor's offset straight into a fresh tensor: one copy out of the
        page cache, with no memory map to fault in and no header to parse again."""
        offset, shape = info.offset, info.shape
        if rows is not None and info.shape:
            row_bytes = info.nbytes // info.shape[0]
            offset += rows[0] * row_bytes
            shape = (rows[1] - rows[0], *info.shape[1:])
        out = torch.empty(shape, dtype=info.dtype)
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # as writer.write_rows does
        try:
            with open(self.path / info.file, "rb", buffering=0) as f:
                f.seek(offset)
                done = 0
                while done < len(buffer):
                    n = f.readinto(buffer[done:])
                    if not n:
                        raise OSError(f"file ends {len(buffer) - done} bytes early")
                    done += n
        except OSError as err:
            raise CheckpointError(f"{self.name}: cannot read tensor {name!r} from {info.file} ({err})", path=self.path, tensor=name) from err
        return out if dtype == info.dtype else out.to(dtype)

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {len(self.tensors)} tensors)"


# Raw bytes are safetensors' own byte order (little-endian) only on little-endian machines;
# elsewhere `safe_open` converts them.
_LITTLE_ENDIAN = sys.byteorder == "little"


# Bytes per element of every safetensors dtype (also those torch cannot average here), to validate a header.
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def read_header(file: Path, name: str) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """Every tensor of a safetensors file as (dtype name, shape, absolute byte offset of its data), from one
    read and one parse of its header, validated as safetensors validates it (offsets contiguous, sizes
    matching shapes and dtypes, the file exactly as long as the header says).

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
