"""What of one tensor a merge keeps in memory within `--max-memory`: every ingredient's blocks (each input
byte read once), in their stored dtype when only that fits, and the relative lr's pivots beside them."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .checkpoint import Checkpoint

logger = logging.getLogger(__name__)


def keep_dtype(checkpoints: Sequence[Checkpoint], name: str, compute: torch.dtype) -> torch.dtype:
    """The dtype blocks of `name` are kept in: the stored one where it is smaller than `compute` and converting
    it back is exact (plain checkpoints, not adapters or dequantized views, sharing one dtype), else `compute`.

    Args:
        checkpoints: the ingredients.
        name: the tensor.
        compute: the compute dtype.

    Returns:
        The dtype to keep blocks in.
    """
    dtypes = {c.info(name).dtype for c in checkpoints}
    stored = dtypes.pop() if len(dtypes) == 1 else compute
    if (stored.is_floating_point and 2 <= stored.itemsize < compute.itemsize
            and all(type(c) is Checkpoint and c.stored[name] not in c.dequantized for c in checkpoints)):
        return stored
    return compute


@dataclass
class Keeping:
    """What of one tensor is kept (`keeping`), and whether some of it is read more than once."""

    blocks: dict | None  # its kept ingredient blocks (filled by the passes), or None
    pivots: dict | None  # its kept pivots, or None
    dtype: torch.dtype  # the dtype its blocks are kept (and read) in
    head: frozenset | None = None  # the blocks kept in `blocks` (`kept_head`); None: all of them
    read_again: int = 0  # when some input bytes are read more than once: the budget that would read each once

    def of(self, rows: Any) -> dict | None:
        """The kept blocks, where block `rows` is kept; else None."""
        return self.blocks if self.head is None or rows in self.head else None


def keeping(checkpoints: Sequence[Checkpoint], name: str, blocks: Sequence[Any], passes: int, compute: torch.dtype,
            max_memory: int, *, relative: bool) -> Keeping:
    """What of tensor `name` is kept: every ingredient's blocks when they fit `max_memory` (in the compute dtype,
    else in the stored one), and with a relative lr the spread's pivots too when they fit beside them (blocks are
    kept in the stored dtype also where only that leaves room for the pivots: the mean computed once). Else,
    with a relative lr, the first blocks that fit (`kept_head`): its spread pass reads the tensor and the steps
    read the rest once more, their means computed twice (keeping the pivots alone would hold a float32 copy of
    the tensor: the 134M model's embedding took the merge's peak memory from about 390 to 510 MiB, to save about
    0.1 s). Without one, the passes over a block share one read when its ingredient blocks fit (`block_loader`).

    Args:
        checkpoints: the ingredients.
        name: the tensor.
        blocks: its blocks of rows (`plan.tensor_blocks`).
        passes: how many times the merge reads each block (one: nothing is worth keeping).
        compute: the compute dtype.
        max_memory: the bytes a tensor's kept blocks may take.
        relative: the learning rate is relative (a spread pass comes first).

    Returns:
        The `Keeping` (empty dicts, filled by the passes).
    """
    # The pivot of a one-block tensor is one block, held by the steps anyway: kept from the spread pass.
    one_block = {} if relative and len(blocks) == 1 else None
    if passes <= 1:  # one pass reads each block once anyway (the soup): keeping them would only cost memory
        return Keeping(None, one_block, compute)
    info = checkpoints[0].info(name)
    numel = info.numel
    pivot_bytes = numel * compute.itemsize
    n, dtype = len(checkpoints), compute
    if n * numel * dtype.itemsize + (pivot_bytes if relative else 0) > max_memory:
        # Half the memory for bfloat16 blocks, converted on load; with a relative lr, also where only that
        # leaves room for the pivots (the mean then computed once, and less kept).
        stored = keep_dtype(checkpoints, name, compute)
        if n * numel * dtype.itemsize > max_memory or n * numel * stored.itemsize + pivot_bytes <= max_memory:
            dtype = stored
    blocks_bytes = n * numel * dtype.itemsize
    if blocks_bytes <= max_memory:
        return Keeping({}, {} if relative and blocks_bytes + pivot_bytes <= max_memory else one_block, dtype)
    logger.debug("%s: %d copies of %.1f MB exceed --max-memory: %s", name, n, numel * dtype.itemsize / 1e6,
                 "its first blocks that fit are kept, the rest read again" if relative else "kept one block at a time")
    if relative:
        head = kept_head(blocks, info.shape, n, dtype, compute, max_memory)
        return Keeping({} if head else None, one_block, dtype, head, read_again=blocks_bytes)
    row = numel // info.shape[0] if info.shape else numel
    largest = max(numel if rows is None else (rows[1] - rows[0]) * row for rows in blocks)
    return Keeping(None, None, dtype, read_again=blocks_bytes if n * largest * dtype.itemsize > max_memory else 0)


def leading_fit(sizes: Sequence[int], max_memory: int, in_flight: int) -> int:
    """How many of the first items, of these sizes, fit `max_memory` together beside `in_flight` bytes.

    >>> leading_fit([3, 3, 3], 10, 2), leading_fit([3, 1], 4, 2)
    (2, 0)
    """
    count, total = 0, in_flight
    for size in sizes:
        total += size
        if total > max_memory:
            break
        count += 1
    return count


def kept_head(blocks: Sequence[Any], shape: tuple[int, ...], n: int, dtype: torch.dtype, compute: torch.dtype,
              max_memory: int) -> frozenset:
    """The first blocks of a tensor whose ingredient blocks fit `max_memory` (in `dtype`) beside the two blocks the
    spread pass computes at once (`_spread_pass`: the main and the I/O thread, each with its block's ingredients
    and their mean): kept from that pass for the steps, which start with them, so that only the rest of the tensor
    is read once more. The steps are element-wise: which blocks are kept changes no value, only how much is read
    again.

    Args:
        blocks: the tensor's blocks of rows, in order (`plan.tensor_blocks`).
        shape: its shape.
        n: the number of ingredients.
        dtype: the dtype its blocks are kept in.
        compute: the compute dtype (the mean's).
        max_memory: the bytes its kept blocks may take.

    Returns:
        The kept blocks' rows (empty: not even the first fits).

    >>> kept_head([(0, 2), (2, 4), (4, 5), (5, 6)], (6, 8), 2, torch.float32, torch.float32, max_memory=640)
    frozenset({(0, 2), (2, 4)})
    """
    if blocks == [None]:  # a tensor of one block: the two in flight are all of it
        return frozenset()
    row = math.prod(shape[1:])
    row_bytes = n * row * dtype.itemsize
    in_flight = 2 * max((rows[1] - rows[0] for rows in blocks), default=0) * (row_bytes + row * compute.itemsize)
    return frozenset(blocks[:leading_fit([(r[1] - r[0]) * row_bytes for r in blocks], max_memory, in_flight)])


def kept_loader(merger: Any, kept: dict, name: str, rows: Any, expected: Sequence[int] = (),
                dtype: torch.dtype | None = None, *, raw: bool = False,
                inline: bool = False) -> Callable[[int], torch.Tensor]:
    """`merger._loader`, but each block is read once and kept for the later passes (the engine never modifies
    what it loads), so the arithmetic and the bytes written are the same. With `dtype` (the stored one, e.g.
    bfloat16) blocks are kept in it and converted to the compute dtype on each load: the same values in half
    the memory. `raw`: the kept tensor as it is, unconverted (for `spread.row_spreads`, which converts exactly
    where it needs to). `inline`: read in the calling thread (`_spread_pass`: the I/O thread computes blocks too)."""
    fresh = list(dict.fromkeys(i for i in expected if (rows, i) not in kept))
    if inline or merger.io is None or not fresh:
        read = lambda i: merger._read(merger.checkpoints[i], name, rows, dtype)  # noqa: E731
    else:
        read = merger._loader(name, rows, fresh, dtype)

    def load(i: int) -> torch.Tensor:
        if (rows, i) not in kept:
            kept[(rows, i)] = read(i)
        block = kept[(rows, i)]
        return block if raw else block.to(merger.compute_dtype)  # the kept tensor itself in the compute dtype

    return load


def block_loader(merger: Any, kept: dict | None, name: str, rows: Any, reads: Sequence[int], shape: tuple[int, ...],
                 dtype: torch.dtype, *, raw: bool = False, inline: bool = False) -> Callable[[int], torch.Tensor]:
    """The loader of one block of a `TensorMerger` that the engine reads in the order `reads`: from the tensor's
    kept blocks, else each of this block's ingredients read once when they fit `max_memory` and are read more
    than once, else read as asked. `raw`: blocks come unconverted, in `dtype` (`kept_loader`). `inline`: read in
    the calling thread."""
    if kept is not None:
        return kept_loader(merger, kept, name, rows, reads, dtype, raw=raw, inline=inline)
    if inline:
        return lambda i: merger._read(merger.checkpoints[i], name, rows, dtype if raw else None)
    block_rows = shape if rows is None else (rows[1] - rows[0], *shape[1:])
    block_bytes = len(merger.checkpoints) * math.prod(block_rows) * dtype.itemsize
    if len(reads) > len(set(reads)) and block_bytes <= merger.max_memory:
        return kept_loader(merger, {}, name, rows, reads, dtype)
    return merger._loader(name, rows, reads)
