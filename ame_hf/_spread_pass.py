"""The relative learning rate's pass over one tensor, before its first step: each block's pivot and row spreads,
read and computed block by block by the main thread and the I/O thread together, each taking the next block."""

from __future__ import annotations

import threading
from typing import Any

import torch

from ._keeping import Keeping, block_loader
from .spread import row_spreads

_DONE = object()


def spread_pass(merger: Any, name: str, blocks: list, keep: Keeping, shape: tuple[int, ...]) -> torch.Tensor:
    """The summed squared distance of the ingredients to each block's pivot, per row of tensor `name`
    (`spread.row_spreads`), and each block's pivot put in `pivots` when that is kept.

    The blocks are independent and each is read and computed by one thread from start to end, so the values do
    not depend on which thread computed it: with an I/O thread (`merger.io`), it and the main thread each take
    the next block not yet taken (two cores instead of one for the costly part of the default merge, balanced
    however fast each is; one block's ingredients, pivot and buffers more in memory).

    Args:
        merger: the run's `TensorMerger`.
        name: the tensor.
        blocks: its blocks of rows (`plan.tensor_blocks`).
        keep: what of it is kept (`_keeping.keeping`): its kept blocks and pivots are filled here.
        shape: its shape.

    Returns:
        One float64 per row (one in all for a 0-D tensor).

    Raises:
        CheckpointError: as `TensorMerger.run`.
    """
    n = len(merger.checkpoints)
    # One float64 per row, made before the first block: a small tensor kept from each block would be carved out
    # of that block's freed memory, so glibc could not reuse it for the next block, and a large tensor's spread
    # pass grew the process by about one block per block (1.3 GB at 3B).
    spreads = torch.empty(shape[0] if shape else 1, dtype=torch.float64)

    def compute(rows: Any) -> None:
        given = merger._pivot_block(name, rows)
        load = block_loader(merger, keep.of(rows), name, rows, range(n), shape, keep.dtype, raw=True, inline=True)
        pivot, spread = row_spreads(load, n, given, merger.compute_dtype)
        (spreads[rows[0]:rows[1]] if rows else spreads).copy_(spread.reshape(-1))  # rows of its own
        # The spread is to the plain mean; a weighted merge starts from its weighted mean instead.
        if keep.pivots is not None and (given is not None or merger.weights is None):
            keep.pivots[rows] = pivot

    todo, lock, stop = iter(blocks), threading.Lock(), threading.Event()

    def work() -> None:  # until no block is left (or the other thread failed)
        while not stop.is_set():
            with lock:
                rows = next(todo, _DONE)
            if rows is _DONE:
                return
            try:
                compute(rows)
            except BaseException:
                stop.set()
                raise

    helper = merger.io.submit(work) if merger.io is not None and len(blocks) > 1 else None
    try:
        work()
    finally:
        if helper is not None:
            helper.result()
    return spreads
