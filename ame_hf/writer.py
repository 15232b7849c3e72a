"""Streaming safetensors writer: shards planned up front, tensors written in place as they finish.

Also the staging directory that makes an output appear only when it is complete.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import DTYPE_NAMES, SAFE_INDEX, SAFE_SINGLE
from .errors import OutputError

logger = logging.getLogger(__name__)


@dataclass
class ShardFile:
    """One output file: its tensors' byte ranges (relative to the data section) and header."""

    name: str
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = field(default_factory=dict)
    header: bytes = b""

    @property
    def data_size(self) -> int:
        return max((e[3] for e in self.entries.values()), default=0)

    def offset(self, tensor: str) -> int:
        """Absolute file offset of a tensor's first byte."""
        return 8 + len(self.header) + self.entries[tensor][2]


@dataclass
class ShardPlan:
    """Where every output tensor goes. Depends only on the tensor list and the shard size, never
    on the number of processes, so any split of the work writes the same bytes."""

    shards: list[ShardFile]
    location: dict[str, ShardFile]

    @property
    def total_size(self) -> int:
        return sum(s.data_size for s in self.shards)


def plan_shards(
    tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    max_shard_size: int,
    metadata: dict[str, str],
) -> ShardPlan:
    """Group tensors (in the given order) into shards of at most `max_shard_size` bytes."""
    groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for name, shape, dtype in tensors:
        nbytes = _numel(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append((name, shape, dtype))
        size += nbytes
    count = len(groups)
    shards = []
    for i, group in enumerate(groups, start=1):
        name = SAFE_SINGLE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
        shard = ShardFile(name=name)
        # Widest dtypes first keeps every tensor aligned to its item size (as safetensors does).
        offset = 0
        for tname, shape, dtype in sorted(group, key=lambda e: (-e[2].itemsize, e[0])):
            end = offset + _numel(shape) * dtype.itemsize
            shard.entries[tname] = (dtype, tuple(shape), offset, end)
            offset = end
        shard.header = _header_bytes(shard, metadata)
        shards.append(shard)
    location = {t: s for s in shards for t in s.entries}
    return ShardPlan(shards=shards, location=location)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _header_bytes(shard: ShardFile, metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt", **metadata}}
    for name, (dtype, shape, start, end) in shard.entries.items():
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def create_shard_files(directory: Path, plan: ShardPlan) -> None:
    """Write every shard's header and size the file; tensors are then written in place."""
    for shard in plan.shards:
        with open(directory / shard.name, "wb") as f:
            f.write(struct.pack("<Q", len(shard.header)))
            f.write(shard.header)
            f.truncate(8 + len(shard.header) + shard.data_size)


def write_rows(directory: Path, plan: ShardPlan, name: str, start_row: int, values: torch.Tensor) -> None:
    """Write `values` as rows `[start_row, start_row + len)` of tensor `name` (any process may)."""
    shard = plan.location[name]
    dtype, shape, _, _ = shard.entries[name]
    row_bytes = (_numel(shape[1:]) if shape else 1) * dtype.itemsize
    data = values.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
    if not data.nbytes:
        return
    fd = os.open(directory / shard.name, os.O_WRONLY)
    try:
        view = memoryview(data)
        offset = shard.offset(name) + start_row * row_bytes
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        os.close(fd)


def write_index(directory: Path, plan: ShardPlan) -> None:
    """The standard `model.safetensors.index.json` (only when there is more than one shard)."""
    if len(plan.shards) == 1:
        return
    index = {
        "metadata": {"total_size": plan.total_size},
        "weight_map": {t: plan.location[t].name for t in sorted(plan.location)},
    }
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


# -- staging -----------------------------------------------------------------------------------

STAGING_PREFIX = ".ame-tmp-"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty `--out` (unless overwrite) and a parent we cannot write, before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} is not empty; pass --overwrite to replace it, or choose another path")
    parent = out.absolute().parent
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create the parent of --out {out}: {err.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: directory {parent} is not writable; choose another path")


def make_staging_dir(out: Path) -> Path:
    """A fresh hidden directory beside `out` (same filesystem, so the final rename is atomic)."""
    out = Path(out).absolute()
    _remove_stale_staging(out)
    try:
        return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{out.name}-{os.getpid()}-", dir=out.parent))
    except OSError as err:
        raise OutputError(f"cannot write beside --out {out}: {err.strerror}") from None


def _remove_stale_staging(out: Path) -> None:
    # A run killed with SIGKILL leaves its staging dir behind; remove those whose process is gone.
    prefix = f"{STAGING_PREFIX}{out.name}-"
    for path in out.parent.glob(prefix + "*"):
        pid_text = path.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move a complete staging directory to `out`; an existing `out` is replaced only at the end."""
    out = Path(out).absolute()
    old = None
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            raise OutputError(f"--out {out} is not empty; pass --overwrite to replace it")
        old = out.parent / f"{STAGING_PREFIX}{out.name}-{os.getpid()}-old"
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def describe_os_error(err: OSError, out: Path) -> str:
    """One line for an OSError met while writing the output."""
    if err.errno == errno.ENOSPC or err.errno == errno.EFBIG:
        return f"not enough space to write the output beside {out} ({err.strerror}); free some space or choose another --out"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write the output beside {out} ({err.strerror}); choose a writable --out"
    return f"writing the output beside {out} failed: {err.strerror or err}"
