"""Streaming safetensors writer: shard files sized up front (from the plan), tensors written in place
as they finish, by any process, and the index."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Sequence

import torch

from ._weight_files import SAFE_INDEX
from .plan import ShardFile, ShardPlan


def create_shard_files(directory: Path, plan: ShardPlan, shards: Sequence[ShardFile] | None = None) -> None:
    """Write every shard's header and size the file; tensors are then written in place.

    Args:
        directory: the staging directory.
        plan: the output's `ShardPlan`.
        shards: only these of its shards (default: all).

    Raises:
        OSError: a file cannot be written (the caller turns it into an `OutputError`).
    """
    for shard in plan.shards if shards is None else shards:
        with open(directory / shard.name, "wb") as f:
            f.write(struct.pack("<Q", len(shard.header)))
            f.write(shard.header)
            f.truncate(8 + len(shard.header) + shard.data_size)


class WrittenDigests:
    """The sha256 of each tensor's bytes, taken from the bytes `write_rows` writes, so that the journal need not
    read a finished tensor back from its shard. A tensor has one only when its bytes were written in order, from
    its first byte to its last, by `write_rows` calls made one at a time (by the writer thread, as `TensorMerger`
    writes them); for any other tensor `take` gives None, and its bytes are read back from the file.

    >>> d = WrittenDigests()
    >>> d.add("w", 0, memoryview(b"ab")); d.add("w", 2, memoryview(b"c"))
    >>> d.take("w", 3) == hashlib.sha256(b"abc").hexdigest()
    True
    >>> d.add("v", 2, memoryview(b"c")); d.take("v", 3) is None  # not from its first byte
    True
    """

    def __init__(self) -> None:
        self._open: dict[str, list] = {}  # name -> [sha256 so far, or None once out of order; the next byte]

    def add(self, name: str, start: int, data: memoryview) -> None:
        """Bytes `[start, start + len(data))` of tensor `name` were just written."""
        entry = self._open.setdefault(name, [hashlib.sha256(), 0])
        if entry[0] is None or start != entry[1]:
            entry[0] = None
            return
        entry[0].update(data)
        entry[1] += data.nbytes

    def take(self, name: str, nbytes: int) -> str | None:
        """The hex digest of tensor `name`'s `nbytes` bytes, when all were written in order, else None; forgets it."""
        entry = self._open.pop(name, None)
        return entry[0].hexdigest() if entry is not None and entry[0] is not None and entry[1] == nbytes else None


def write_rows(directory: Path, plan: ShardPlan, name: str, start_row: int, values: torch.Tensor,
               digests: WrittenDigests | None = None) -> None:
    """Write `values` as rows `[start_row, start_row + len)` of tensor `name` (any process may).

    Args:
        directory: the staging directory, whose shard files `create_shard_files` made.
        plan: the output's `ShardPlan`.
        name: the tensor.
        start_row: its first row these values are (0 for a whole tensor).
        values: the rows, converted to the tensor's output dtype here.
        digests: where to add the bytes written to the tensor's sha256 (the journal's, without a read back).

    Raises:
        OSError: the file cannot be written.

    >>> import tempfile
    >>> from safetensors.torch import load_file
    >>> from ame_hf.plan import plan_shards
    >>> plan = plan_shards([("w", (2, 2), torch.float32)], 2**20, {})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     create_shard_files(Path(tmp), plan)
    ...     write_rows(Path(tmp), plan, "w", 1, torch.ones(1, 2))
    ...     load_file(Path(tmp) / "model.safetensors")["w"]
    tensor([[0., 0.],
            [1., 1.]])
    """
    shard = plan.location[name]
    dtype, shape, _, _ = shard.entries[name]
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
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
    if digests is not None:
        digests.add(name, start_row * row_bytes, memoryview(data))


def write_index(directory: Path, plan: ShardPlan) -> None:
    """The standard `model.safetensors.index.json` (only when there is more than one shard).

    Args:
        directory: the staging directory.
        plan: the output's `ShardPlan`.

    Raises:
        OSError: the file cannot be written.
    """
    if len(plan.shards) == 1:
        return
    index = {
        "metadata": {"total_size": plan.total_size},
        "weight_map": {t: plan.location[t].name for t in sorted(plan.location)},
    }
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
