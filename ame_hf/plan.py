"""The plan of a merge, fixed before any tensor is computed: the blocks (ranges of rows) each tensor is
processed in, the output shard layout and the split of tensors between processes."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ._weight_files import SAFE_SINGLE
from .checkpoint import DTYPE_NAMES
from .config import QUANTIZED_OUTPUT_DTYPES, AmeConfig

# Tensors larger than this many elements are processed in blocks of rows. Every supported
# optimizer is element-wise, so blocks change no value; they bound memory by one block. The
# blocks depend only on the shape, so any split over processes computes the same bytes.
BLOCK_ELEMENTS = int(os.environ.get("AME_HF_BLOCK_ELEMENTS", 1 << 20))

# On a GPU, blocks 16x larger keep the device busy; memory there is bounded all the same.
GPU_BLOCK_FACTOR = 16

Rows = tuple[int, int] | None  # a block: rows [start, stop) of a tensor's first dimension, or None for all


def row_blocks(shape: Sequence[int], elements: int | None = None) -> list[Rows]:
    """Row ranges covering a tensor; `[None]` when it is small enough to take whole.

    Args:
        shape: the tensor's shape.
        elements: the most elements in one block (default `BLOCK_ELEMENTS`).

    Returns:
        The blocks: `(start, stop)` rows of the first dimension, in order, or `[None]`.

    >>> row_blocks((5, 4), elements=8)
    [(0, 2), (2, 4), (4, 5)]
    >>> row_blocks((5, 4), elements=100)
    [None]
    """
    elements = elements or BLOCK_ELEMENTS
    numel = math.prod(shape)
    if not shape or numel <= elements:
        return [None]
    row = max(1, numel // shape[0])
    step = max(1, elements // row)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def tensor_blocks(shape: Sequence[int], device: torch.device) -> list[Rows]:
    """The blocks of a tensor on this device (larger on a GPU).

    Args:
        shape: the tensor's shape.
        device: where it is merged.

    Returns:
        As `row_blocks`.
    """
    return row_blocks(shape, BLOCK_ELEMENTS * (GPU_BLOCK_FACTOR if device.type == "cuda" else 1))


def assign_to_processes(sizes: dict[str, int], count: int) -> list[list[str]]:
    """Split tensors between processes, balanced by bytes (largest first onto the lightest).

    Args:
        sizes: each tensor's size in bytes, by name.
        count: the number of processes.

    Returns:
        Each process's tensor names (sorted), by rank.

    >>> assign_to_processes({"a": 30, "b": 20, "c": 10}, 2)
    [['a'], ['b', 'c']]
    """
    loads = [0] * count
    parts: list[list[str]] = [[] for _ in range(count)]
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        i = min(range(count), key=lambda j: (loads[j], j))
        parts[i].append(name)
        loads[i] += size
    return [sorted(p) for p in parts]


def output_dtype(config: AmeConfig, stored: torch.dtype) -> torch.dtype:
    """The dtype a tensor is written in: the ingredients' (`auto`, and always for integers) or `config.dtype`.

    Args:
        config: the run's `AmeConfig`.
        stored: the ingredients' dtype of the tensor.

    Returns:
        The output dtype.

    >>> output_dtype(AmeConfig(dtype="bfloat16"), torch.float32), output_dtype(AmeConfig(dtype="bfloat16"), torch.int64)
    (torch.bfloat16, torch.int64)
    """
    if not stored.is_floating_point or config.dtype in ("auto", *QUANTIZED_OUTPUT_DTYPES):  # quantized when finished
        return stored
    return getattr(torch, config.dtype)


@dataclass
class ShardFile:
    """One output file: its tensors' byte ranges (relative to the data section) and header."""

    name: str
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = field(default_factory=dict)
    header: bytes = b""

    @property
    def data_size(self) -> int:
        """Bytes of tensor data after the header."""
        return max((e[3] for e in self.entries.values()), default=0)

    def offset(self, tensor: str) -> int:
        """Absolute file offset of a tensor's first byte.

        Args:
            tensor: a tensor of this shard.

        Returns:
            The offset in bytes from the start of the file (after the length prefix and the header).
        """
        return 8 + len(self.header) + self.entries[tensor][2]


@dataclass
class ShardPlan:
    """Where every output tensor goes. Depends only on the tensor list and the shard size, never
    on the number of processes, so any split of the work writes the same bytes."""

    shards: list[ShardFile]
    location: dict[str, ShardFile]

    @property
    def total_size(self) -> int:
        """Bytes of tensor data in all shards (the index's `total_size`)."""
        return sum(s.data_size for s in self.shards)

    def nbytes(self, tensor: str) -> int:
        """Bytes of one output tensor."""
        _, _, start, end = self.location[tensor].entries[tensor]
        return end - start


def plan_shards(
    tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    max_shard_size: int,
    metadata: dict[str, str],
) -> ShardPlan:
    """Group tensors (in the given order) into shards of at most `max_shard_size` bytes.

    Args:
        tensors: `(name, shape, output dtype)` of every output tensor, in the order they are grouped.
        max_shard_size: the most bytes in one shard (a larger tensor gets a shard of its own).
        metadata: the safetensors header metadata of every shard (the AME stamp).

    Returns:
        The `ShardPlan`: one `model.safetensors`, or `model-0000i-of-0000n.safetensors` files.

    >>> plan = plan_shards([("a", (4,), torch.float32), ("b", (4,), torch.float32)], 16, {})
    >>> [s.name for s in plan.shards], plan.total_size
    (['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'], 32)
    """
    groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
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
            end = offset + math.prod(shape) * dtype.itemsize
            shard.entries[tname] = (dtype, tuple(shape), offset, end)
            offset = end
        shard.header = _header_bytes(shard, metadata)
        shards.append(shard)
    location = {t: s for s in shards for t in s.entries}
    return ShardPlan(shards=shards, location=location)


def _header_bytes(shard: ShardFile, metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt", **metadata}}
    for name, (dtype, shape, start, end) in shard.entries.items():
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def index_runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs of `indices` as [start, stop) ranges, in order."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
