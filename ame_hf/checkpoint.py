"""`Checkpoint`: a lazy, read-only view over one model directory's weights and config.

Each safetensors header is read and validated once (`read_header`); tensors (or slices of rows) are then
read with one positioned read each into a fresh tensor; `.bin` only via `weights_only`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._model_files import read_config
from ._saved_layout import to_saved_layout
from ._weight_files import index_shards, read_header, weight_layout
from .dequantize import STORED_ONLY, Quantized, dequantized_view, read_dequantized
from .errors import CheckpointError, IngredientNotFoundError

logger = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_from_name(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name (`F32`, `BF16`, ...); None for FP8 and other quantized ones.

    Args:
        name: the dtype as a safetensors header writes it.

    Returns:
        The torch dtype, or None.

    >>> dtype_from_name("BF16"), dtype_from_name("F8_E4M3")
    (torch.bfloat16, None)
    """
    return _DTYPES.get(name)


def stored_dtype(name: str) -> torch.dtype | None:
    """The torch dtype a safetensors dtype name is read as, FP8 ones too (which only dequantization averages).

    >>> stored_dtype("F8_E4M3"), stored_dtype("C64")
    (torch.float8_e4m3fn, None)
    """
    return _DTYPES.get(name) or getattr(torch, STORED_ONLY.get(name, "-"), None)


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it looks like, without reading it.

    Attributes:
        file: the weight file that holds it (empty for `.bin` weights, loaded whole).
        shape: its shape.
        dtype: its stored dtype.
        offset: the absolute byte offset of its data in a safetensors file (-1: not known).

    >>> TensorInfo(file="model.safetensors", shape=(2, 3), dtype=torch.float16).nbytes
    12
    """

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = -1  # byte offset of the data in a safetensors file (-1: not known)

    @property
    def numel(self) -> int:
        """The number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """The size of its data in bytes."""
        return self.numel * self.dtype.itemsize


class ReadCount:
    """Bytes of tensor data read from a checkpoint's files (shared by its renamed views), so that the
    read-once property of a merge can be measured and tested."""

    def __init__(self) -> None:
        self.bytes = 0
        self._lock = threading.Lock()  # the main thread and the I/O thread both read (`_spread_pass`)

    def add(self, nbytes: int) -> None:
        """Count `nbytes` more bytes read."""
        with self._lock:
            self.bytes += nbytes


class Checkpoint:
    """Lazy view over the weights of one model directory (an FP8 or MXFP4 one dequantized, as transformers loads it).

    Args:
        path: a directory with `model.safetensors`, a sharded `model.safetensors.index.json`,
            or (only when there is no safetensors) `pytorch_model.bin[.index.json]`.
        name: how to call this checkpoint in messages (the user's reference).
        variant: read the weights variant NAME (`model.NAME.safetensors`).
        config: its parsed `config.json`, when the caller already read it (else it is read here).

    Raises:
        IngredientNotFoundError: `path` is no directory.
        CheckpointError: no weights, an invalid index or header, a `.bin` file that is no plain state dict, or no
            tensors at all.

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
        self.dequantized: dict[str, Quantized] = {}  # stored name -> its quantized parts (`dequantized_view`)
        if not self.path.is_dir():
            raise IngredientNotFoundError(f"{self.name}: no such directory {self.path}", ref=self.name)
        # The input stage passes the config it already read: each config.json is parsed once a run.
        self.config = config if config is not None else read_config(self.path, self.name)
        self._bin: dict[str, torch.Tensor] | None = None
        # Tensors in dtypes torch cannot average (FP8 and other quantized formats): name -> dtype; `raw`: where
        # those torch can hold lie (an FP8 checkpoint's values, dequantized by `dequantized_view`).
        self.unsupported: dict[str, str] = {}
        self.raw: dict[str, TensorInfo] = {}
        self.tensors: dict[str, TensorInfo] = self._scan()
        self.stored: dict[str, str] = {n: n for n in self.tensors}  # name -> name in the file
        dequantized_view(self)  # FP8 and MXFP4: the tensors transformers loads, dequantized
        to_saved_layout(self)  # fused MoE experts and the like: under the names save_pretrained writes
        if not self.tensors and not self.unsupported:
            raise CheckpointError(f"{self.name}: the weights contain no tensors", path=self.path)

    @classmethod
    def from_header(cls, name: str, config: dict[str, Any], tensors: dict[str, TensorInfo],
                    unsupported: dict[str, str] | None = None, path: Path | None = None,
                    raw: dict[str, TensorInfo] | None = None) -> "Checkpoint":
        """A checkpoint known only by its config and safetensors headers (read from the Hub with range
        requests): enough to check it, not to read it.

        Args:
            name: how to call it in messages.
            config: its parsed `config.json`.
            tensors: its tensors by name (their files, shapes and dtypes).
            unsupported: tensors in dtypes torch cannot hold here (FP8, ...): name -> safetensors dtype.
            path: the folder of its light files, if any.
            raw: of the unsupported tensors, those torch can hold (FP8): name -> `TensorInfo`.

        Returns:
            The header-only checkpoint (`header_only` is True; `read` refuses).
        """
        ckpt = cls.__new__(cls)
        ckpt.path, ckpt.name, ckpt.variant, ckpt.config = path, name, None, config
        ckpt.header_only = True
        ckpt._bin, ckpt.unsupported, ckpt.tensors = None, dict(unsupported or {}), dict(tensors)
        ckpt.stored = {n: n for n in tensors}
        ckpt.reads = ReadCount()
        ckpt.format, ckpt.files = "safetensors", sorted({t.file for t in tensors.values()})
        ckpt.raw, ckpt.dequantized = dict(raw or {}), {}
        dequantized_view(ckpt)
        to_saved_layout(ckpt)
        return ckpt

    def renamed(self, names: dict[str, str]) -> "Checkpoint":
        """The same files seen under other tensor names: `names` maps a new name to a stored one.

        Args:
            names: new name -> the name it is stored under (tensors left out are not in the view).

        Returns:
            A view that shares this checkpoint's files and read count.
        """
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
            raise CheckpointError(f"{self.name} ({self.path}): {err}", path=self.path, fields=err.fields) from err
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
                    if stored_dtype(dtype_name) is not None:
                        self.raw[key] = TensorInfo(file=f, shape=shape, dtype=stored_dtype(dtype_name), offset=offset)
                    continue
                if key in tensors:
                    raise CheckpointError(f"{self.name}: tensor {key!r} appears in two shards", path=self.path, tensor=key)
                tensors[key] = TensorInfo(file=f, shape=shape, dtype=dtype, offset=offset)
        return tensors

    def same_tensors(self, checked: "Checkpoint") -> None:
        """After a download: the files hold exactly the tensors (names, shapes, dtypes) whose headers were checked.

        Args:
            checked: the header-only checkpoint the check saw.

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
        """Tensor names in a stable (sorted) order.

        Returns:
            The names.
        """
        return sorted(self.tensors)

    def info(self, name: str) -> TensorInfo:
        """Where tensor `name` lives and what it looks like.

        Args:
            name: a tensor of this checkpoint.

        Returns:
            Its `TensorInfo`.
        """
        return self.tensors[name]

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh copy of one tensor, or of rows `[start, stop)` of its first dimension,
        optionally converted to `dtype` (in the same copy).

        Never a view of the memory map: safetensors may hand back shared memory, and the
        engine updates tensors in place.

        Args:
            name: a tensor of this checkpoint.
            rows: `(start, stop)` rows of its first dimension, or None for all of it.
            dtype: the dtype of the copy (default: the stored one).

        Returns:
            A tensor of its own.

        Raises:
            CheckpointError: a header-only checkpoint, or a file that cannot be read.
        """
        info = self.tensors[name]
        dtype = dtype or info.dtype
        if self.path is None:
            raise CheckpointError(f"{self.name}: only its headers were read; download it to read {name!r}",
                                  tensor=name)
        quantized = self.dequantized.get(self.stored[name])
        if quantized is not None:
            try:
                return read_dequantized(self, quantized, rows).to(dtype)
            except (OSError, RuntimeError) as err:
                raise CheckpointError(f"{self.name}: cannot dequantize tensor {name!r} ({err})", path=self.path,
                                      tensor=name) from err
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
