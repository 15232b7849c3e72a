"""The relative learning rate's spread and the mean pivot, per block of rows: in the blocks' own dtype where
that stays within 1e-6 of float64, and the same values however a tensor is cut into blocks."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Loader = Callable[[int], torch.Tensor]


# The float64 mean is computed this many values at a time: two float64 buffers that stay in a core's cache,
# 4-5x faster on a CPU than converting whole blocks (which streams 8 bytes per value through memory, twice).
MEAN_CHUNK = 1 << 17


def mean_of(load: Loader, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The mean of `n` ingredients' blocks: summed in float64 in order, divided, rounded once to `dtype` (so
    the mean of equal values is that value).

    Computed `MEAN_CHUNK` values at a time, each ingredient's chunk converted into a float64 buffer before it
    is added: the same values as adding whole blocks (an add that mixes dtypes casts element by element, and
    whole float64 blocks do not stay in cache).

    Args:
        load: `load(i)` gives ingredient `i`'s values for the block (never modified here).
        n: the number of ingredients.
        dtype: the mean's dtype (default: the loaded one). Blocks kept in their stored dtype (bfloat16) are read
            as they are: each value goes into float64 exactly, as it would from a float32 copy, without that copy.

    Returns:
        Their mean, a tensor of its own.

    >>> mean_of([torch.tensor([0.0, 2.0]), torch.tensor([1.0, 2.0])].__getitem__, 2)
    tensor([0.5000, 2.0000])
    """
    loaded = [load(i) for i in range(n)]  # all n at once (a block each), as the steps of a kept block hold them
    blocks = [x.reshape(-1) for x in loaded]
    first = blocks[0]
    out = torch.empty(loaded[0].shape, dtype=dtype or first.dtype, device=first.device)
    flat = out.view(-1)
    size = min(MEAN_CHUNK, first.numel())
    total = torch.empty(size, dtype=torch.float64, device=first.device)
    buffer = torch.empty_like(total)
    for start in range(0, first.numel(), MEAN_CHUNK):
        stop = min(start + MEAN_CHUNK, first.numel())
        t = total[:stop - start].copy_(first[start:stop])
        for x in blocks[1:]:
            t.add_(buffer[:stop - start].copy_(x[start:stop]))
        flat[start:stop].copy_(t.div_(n))
    return out


def squared_distance(x: torch.Tensor, pivot: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """(x - pivot)^2 summed over each row of a block (each value of a 1-D block), in the block's dtype: no
    float64 copy of the block, and a row's sum does not depend on where a block of rows starts.

    Args:
        x: one ingredient's values.
        pivot: the pivot's values (the same shape and dtype).
        buffer: a scratch tensor of that shape and dtype (overwritten).

    Returns:
        One sum per row (first dimension), in the block's dtype.

    >>> squared_distance(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]]), torch.empty(1, 2))
    tensor([5.])
    """
    d = torch.sub(x, pivot, out=buffer)
    d.mul_(d)
    rows = d.shape[0] if d.dim() > 1 else d.numel()
    return d.reshape(rows, -1).sum(1) if d.numel() else d.new_zeros(rows)


def row_spreads(load: Loader, n: int, pivot: torch.Tensor | None,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pivot of a block and, per row, the ingredients' summed squared distance to it (the relative lr's
    spread; `spread_total` adds the rows of a whole tensor).

    With `pivot=None` the pivot is their mean (`mean_of`, as the merge starts from it), from the same blocks:
    `load` is called once for each ingredient, in order, and the `n` blocks are held together. Each
    ingredient's row sums are computed in the block's dtype (`squared_distance`) and added in float64: within
    1e-6 relative of a float64 computation (tests/test_spread.py), without converting every block to float64.

    Args:
        load: `load(i)` gives ingredient `i`'s values for the block (never modified here).
        n: the number of ingredients.
        pivot: the block's pivot, or None for their mean.
        dtype: the compute dtype, when `load` gives blocks in a dtype that converts to it exactly (bfloat16 blocks
            kept as stored): the mean reads them as they are, the distances from a converted copy (faster than a
            subtraction that mixes dtypes). Default: the loaded dtype.

    Returns:
        The pivot (`pivot` itself, or the mean: a tensor of its own), and a float64 sum per row.

    >>> values = [torch.tensor([0.0, 2.0]), torch.tensor([2.0, 2.0])]
    >>> row_spreads(values.__getitem__, 2, None)
    (tensor([1., 2.]), tensor([2., 0.], dtype=torch.float64))
    """
    loaded = [load(i) for i in range(n)] if pivot is None else None  # the mean's blocks serve the distances too
    if loaded is not None:
        load = loaded.__getitem__
        pivot = mean_of(load, n, dtype)
    buffer = torch.empty_like(pivot)
    total = squared_distance(load(0).to(pivot.dtype), pivot, buffer).double()
    for i in range(1, n):
        total += squared_distance(load(i).to(pivot.dtype), pivot, buffer)
    return pivot, total


def spread_total(rows: Sequence[torch.Tensor]) -> float:
    """The exactly rounded sum of per-row spreads (`row_spreads`) of a whole tensor: the same float however the
    tensor was cut into blocks (DESIGN §1: the cut never shows).

    >>> spread_total([torch.tensor([0.1, 0.2], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)])
    0.6
    """
    return math.fsum(torch.cat([r.reshape(-1) for r in rows]).tolist()) if rows else 0.0


def spread_sum(load: Loader, n: int, pivot: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """`row_spreads` of one block, its rows added: (the pivot, the summed squared distance to it).

    Args:
        load: `load(i)` gives ingredient `i`'s values for the block (never modified here).
        n: the number of ingredients.
        pivot: the block's pivot, or None for their mean.

    Returns:
        The pivot (`pivot` itself, or the mean), and the ingredients' summed squared distance to it.

    >>> values = [torch.tensor([0.0, 2.0]), torch.tensor([2.0, 2.0])]
    >>> spread_sum(values.__getitem__, 2, None)
    (tensor([1., 2.]), 2.0)
    """
    pivot, rows = row_spreads(load, n, pivot)
    return pivot, spread_total([rows])


def relative_lr_value(relative_lr: float, squared_distance: float, count: int) -> float:
    """relative_lr times the RMS of (ingredient - pivot) over a whole tensor (`count` values).

    Args:
        relative_lr: the learning rate relative to the spread.
        squared_distance: the summed squared distance of the ingredients to the pivot (`spread_sum`'s).
        count: how many values that sum is over (ingredients x elements).

    Returns:
        The tensor's learning rate (0 for an empty tensor).

    >>> relative_lr_value(0.5, squared_distance=16.0, count=4)
    1.0
    """
    return relative_lr * math.sqrt(squared_distance / count) if count else 0.0
