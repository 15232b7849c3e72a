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
    return _mean_and_spreads([load(i) for i in range(n)], dtype, spreads=False)[0]


def _rows(t: torch.Tensor) -> int:
    """The rows of a block as `squared_distance` sums them (each value of a 0-D or 1-D block is a row)."""
    return t.shape[0] if t.dim() > 1 else t.numel()


def _mean_and_spreads(loaded: Sequence[torch.Tensor], dtype: torch.dtype | None,
                      spreads: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`mean_of` of the blocks `loaded` (all n held together), and with `spreads` each row's summed squared
    distance to that mean in float64 (`row_spreads`), computed in the same chunk loop while each chunk of the
    mean and of the blocks is still in cache: a chunk is whole rows, at least two (each row is then summed
    on its own, as in a whole block, whatever the threads), so every row sum is the one `squared_distance`
    gives for the whole block. None when a row is too long for that (the caller computes them from the block).
    """
    blocks = [x.reshape(-1) for x in loaded]
    first, n = blocks[0], len(blocks)
    out = torch.empty(loaded[0].shape, dtype=dtype or first.dtype, device=first.device)
    flat, numel = out.view(-1), first.numel()
    rows = _rows(loaded[0])
    cols = numel // rows if rows else 0
    fused = spreads and numel > 0 and cols <= MEAN_CHUNK // 2
    step = MEAN_CHUNK // cols * cols if fused else MEAN_CHUNK
    starts = list(range(0, numel, step))
    if fused and len(starts) > 1 and numel - starts[-1] == cols:
        starts.pop()  # a last chunk of one row would be summed by threads in another order: the one before takes it
    stops = [*starts[1:], numel]
    size = max((b - a for a, b in zip(starts, stops)), default=0)
    total = torch.empty(size, dtype=torch.float64, device=first.device)
    buffer = torch.empty_like(total)
    if fused:
        spread = torch.empty(rows, dtype=torch.float64, device=first.device)
        diff = torch.empty(size, dtype=out.dtype, device=first.device)
        sums = torch.empty(size // cols, dtype=out.dtype, device=first.device)
    for start, stop in zip(starts, stops):
        t = total[:stop - start].copy_(first[start:stop])
        for x in blocks[1:]:
            t.add_(buffer[:stop - start].copy_(x[start:stop]))
        pivot = flat[start:stop].copy_(t.div_(n))
        if not fused:
            continue
        # squared_distance of each ingredient's rows, chunk by chunk: x (in the mean's dtype) - pivot, squared,
        # summed per row in that dtype, the ingredients' sums added in float64 in order.
        row_sums, part = sums[:(stop - start) // cols], spread[start // cols:stop // cols]
        for k, x in enumerate(blocks):
            d = diff[:stop - start]
            if x.dtype == out.dtype:
                torch.sub(x[start:stop], pivot, out=d)
            else:
                d.copy_(x[start:stop]).sub_(pivot)
            d.mul_(d)
            torch.sum(d.view(-1, cols), 1, out=row_sums)
            part.copy_(row_sums) if k == 0 else part.add_(row_sums)
    return out, (spread if fused else None)


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
    `load` is called once for each ingredient, in order, and the `n` blocks are held together; the distances
    are then computed in the mean's cache-sized chunk loop, from the chunks it has just read. Each
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
    if pivot is None:  # the mean's blocks serve the distances too
        loaded = [load(i) for i in range(n)]
        pivot, spread = _mean_and_spreads(loaded, dtype, spreads=True)
        if spread is not None:
            return pivot, spread
        load = loaded.__getitem__
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
