"""Streaming safetensors writer: shards planned up front, tensors written in place as they finish."""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import DTYPE_NAMES, SAFE_INDEX, SAFE_SINGLE

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
