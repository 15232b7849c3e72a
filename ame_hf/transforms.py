"""Task-vector transforms before AME (README "TIES and DARE"): TIES, DARE and breadcrumbs, streamed.

Each ingredient's task vector is `d_i = x_i - pivot` (the pivot is the base). A transform sparsifies it (`ties`:
keep the `density` largest magnitudes of the tensor; `dare`: keep each entry with probability `density`, by a
mask that is a hash of (seed, tensor name, ingredient index, element index); `breadcrumbs`: drop the `gamma`
largest and the smallest), rescales what it keeps (`density`: 1/density; `l1`: to the task vector's L1 norm),
and the `*ties` transforms elect a sign per element (the sign of the weighted sum) and keep only the entries
that agree, scaled so that the (weighted) mean over all ingredients is the mean over those that agree (TIES's
disjoint mean; `disjoint_sum`: averaged over all ingredients, a sum once lr is multiplied by the weights' sum).
AME then runs on `pivot + d_i'`, with any optimizer, so `sgd, lr 1, constant, batch = all` from the base is
mergekit's merge.

A per-tensor magnitude threshold is found exactly by a radix select over the tensor's blocks (a first pass over
the tensor, 2 reads of each ingredient in float32, or one where its task vector fits `--max-memory` and is kept for
the pass), and L1 norms by exact sums of row sums: so no byte depends on the block size or the process count.
Memory: one block of every ingredient (blocks are cut to 1/N of the usual), and with a relative lr the transformed
blocks its spread pass keeps for the steps, within `--max-memory`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from ._keeping import leading_fit
from .engine import ame_block
from . import plan as _plan
from .plan import Rows, ShardPlan, row_blocks
from .spread import relative_lr_value, row_spreads, spread_total
from .transform_options import ELECTS, SPARSIFY, per_ingredient, rescale_of
from .weights import relative_weights, weighted_mean

logger = logging.getLogger(__name__)

_M32 = 0xFFFFFFFF


def kth_largest(magnitudes: Callable[[], Iterator[torch.Tensor]], k: int, dtype: torch.dtype = torch.float32) -> float:
    """The exact `k`-th largest (1-based) of non-negative float32/float64 values given block by block, by a radix
    select on their bit patterns (ordered as integers): 2 passes for float32, 4 for float64; no sort, and the
    same value however the blocks are cut.

    >>> kth_largest(lambda: iter([torch.tensor([0.5, 3.0]), torch.tensor([2.0, 1.0])]), 2)
    2.0
    """
    single = dtype == torch.float32
    total = 31 if single else 63
    prefix, known = 0, 0
    for width in (15, 16) if single else (15, 16, 16, 16):
        shift = total - known - width
        hist = torch.zeros(2 ** width, dtype=torch.int64)
        for m in magnitudes():
            bits = m.reshape(-1).view(torch.int32 if single else torch.int64).to(torch.int64)
            if known:
                bits = bits[(bits >> (total - known)) == prefix]
            hist += torch.bincount((bits >> shift) & (2 ** width - 1), minlength=2 ** width).cpu()
        cum = hist.flip(0).cumsum(0)
        index = int(torch.searchsorted(cum, torch.tensor(k)))
        k -= int(cum[index - 1]) if index else 0
        prefix, known = (prefix << width) | (2 ** width - 1 - index), known + width
    bits = torch.tensor([prefix], dtype=torch.int32 if single else torch.int64)
    return float(bits.view(dtype)[0])


def keep_mask(seed: int, name: str, ingredient: int, offset: int, numel: int, density: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """DARE's keep mask of elements `offset .. offset+numel` of tensor `name` for `ingredient`: a 32-bit hash of
    (seed, name, ingredient, element index) below `density * 2**32`, so the mask does not depend on the blocks.

    >>> bool(keep_mask(0, "w", 1, 0, 10, 0.5).equal(torch.cat([keep_mask(0, "w", 1, 0, 4, 0.5),
    ...                                                         keep_mask(0, "w", 1, 4, 6, 0.5)])))
    True
    """
    digest = hashlib.sha256(f"ame-hf-dare:{seed}:{name}:{ingredient}".encode()).digest()
    k1, k2 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    h = _mix((index & _M32) ^ k1)
    h = _mix(h ^ (index >> 32) ^ k2)
    return h < int(density * 2 ** 32)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (values in [0, 2**32) held in int64; no product overflows 63 bits)."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def _rowsum_abs(t: torch.Tensor) -> float:
    """The sum of |t| in float64, the same however the tensor is cut into blocks of rows: per-row sums (each
    element of a 1-D tensor is a row) combined exactly by `math.fsum`."""
    rows = t.reshape(t.shape[0] if t.dim() else 1, -1).abs().double().sum(dim=1)
    return math.fsum(rows.tolist())


class TensorTransform:
    """The transform of one tensor: its per-ingredient statistics (thresholds, L1 factors), then block by block."""

    def __init__(self, merger: Any, name: str, blocks: list[Rows], pivot_block: Callable) -> None:
        self.merger, self.name, self.blocks, self.pivot_block = merger, name, blocks, pivot_block
        cfg = merger.config
        self.n, self.dtype = len(merger.checkpoints), merger.compute_dtype
        self.sparsify, self.elect, self.rescale = SPARSIFY[cfg.transform], cfg.transform in ELECTS, rescale_of(cfg)
        self.raw_weights = list(cfg.weights) if cfg.weights is not None else [1.0] * self.n
        info = merger.checkpoints[0].info(name)
        self.shape, self.numel = info.shape, info.numel
        self.row = max(1, self.numel // info.shape[0]) if info.shape else 1
        self.bands: list[tuple[float, float] | None] = [None] * self.n  # kept |d| in [lo, hi]; None: all
        self.factors = [1.0] * self.n
        first_pass = self.sparsify in ("magnitude", "outliers") or self.rescale == "l1"
        # One ingredient's |task vector| is kept for the first pass when the tensor fits `--max-memory`: each
        # ingredient (and the pivot with it) read once there, else once per radix-select pass and L1 norm; and the
        # pivot's blocks beside it when both fit, so the pivot is read once for all of them.
        keep = self.numel * self.dtype.itemsize <= merger.max_memory
        first_pass = first_pass and any(per_ingredient(cfg.density, i) < 1 for i in range(self.n))
        pivots = {}
        if first_pass and 2 * self.numel * self.dtype.itemsize <= merger.max_memory:
            pivots = dict(zip(blocks, _Kept(self.numel, self.dtype, merger.device).put_all(map(pivot_block, blocks))))
        if first_pass:
            selects = {"magnitude": 1, "outliers": 2}.get(self.sparsify or "", 0)
            reads = 1 if keep else selects * (2 if self.dtype == torch.float32 else 4) + (self.rescale == "l1")
            logger.debug("%s: %s needs a first pass over the tensor (the magnitude threshold or L1 norm of each task "
                         "vector): each ingredient and the pivot are read %d more time(s)", name, cfg.transform, reads)
        for i in range(self.n):
            density = per_ingredient(cfg.density, i)
            if first_pass and density < 1:
                kept = None  # the previous ingredient's, freed before this one's are computed
                kept = (_Kept(self.numel, self.dtype, merger.device).put_all(self._magnitudes(i, pivots)) if keep
                        else None)
                magnitudes = (lambda: iter(kept)) if keep else (lambda: self._magnitudes(i, pivots))
            if self.sparsify == "magnitude" and density < 1:
                t = kth_largest(magnitudes, dtype=self.dtype, k=max(1, int(density * self.numel)))
                self.bands[i] = (t, math.inf)
            elif self.sparsify == "outliers" and density < 1:
                target = int(density * self.numel)
                bottom = max(0, self.numel - target - int(per_ingredient(cfg.gamma, i) * self.numel))
                self.bands[i] = (math.inf, -math.inf) if target == 0 else (
                    kth_largest(magnitudes, dtype=self.dtype, k=self.numel - bottom),
                    kth_largest(magnitudes, dtype=self.dtype, k=self.numel - bottom - target + 1))
            if self.rescale == "density" and density < 1:
                self.factors[i] = 1.0 / density
            elif self.rescale == "l1" and density < 1:
                before = after = 0.0
                for rows, m in zip(blocks, magnitudes()):  # |d| * keep is |d * keep|: the same sums
                    before += _rowsum_abs(m)
                    after += _rowsum_abs(m * self._keep(i, rows, m))
                self.factors[i] = 1.0 if before < 1e-7 or after < 1e-7 else before / after

    def _delta(self, i: int, rows: Rows, pivot: torch.Tensor | None = None) -> torch.Tensor:
        """Ingredient i's task vector on block `rows`, from the pivot's block when it is given (else read)."""
        return self.merger._read(self.merger.checkpoints[i], self.name, rows) - (
            self.pivot_block(rows) if pivot is None else pivot)

    def _magnitudes(self, i: int, pivots: dict[Rows, torch.Tensor]) -> Iterator[torch.Tensor]:
        """Ingredient i's |task vector|, block by block (the pivot's blocks from `pivots` where kept)."""
        for rows in self.blocks:
            yield self._delta(i, rows, pivots.get(rows)).abs_()

    def _keep(self, i: int, rows: Rows, d: torch.Tensor) -> torch.Tensor | float:
        """Ingredient i's keep mask on block `rows` (1.0: keep everything)."""
        density = per_ingredient(self.merger.config.density, i)
        if self.sparsify == "random" and density < 1:
            offset = rows[0] * self.row if rows else 0
            return keep_mask(self.merger.config.seed, self.name, i, offset, d.numel(), density,
                             d.device).reshape(d.shape)
        band = self.bands[i]
        if band is None:
            return 1.0
        m = d.abs()
        return (m >= band[0]) & (m <= band[1])

    def block(self, rows: Rows, pivot: torch.Tensor) -> list[torch.Tensor]:
        """Every ingredient's transformed block `pivot + d_i'`."""
        deltas = []
        for i in range(self.n):
            d = self._delta(i, rows, pivot)  # the pivot is read once per block, not once per ingredient
            d = d * self._keep(i, rows, d)
            if self.factors[i] != 1.0:
                d = d * self.factors[i]
            deltas.append(d)
        if self.elect:
            w = self.raw_weights
            total = torch.zeros_like(deltas[0])
            for d, wi in zip(deltas, w):
                total.add_(d, alpha=wi)
            majority = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
            masks = [torch.sign(d * wi) == majority for d, wi in zip(deltas, w)]
            deltas = [d * m for d, m in zip(deltas, masks)]
            if not self.merger.config.disjoint_sum:
                agreeing = torch.zeros_like(total)
                for m, wi in zip(masks, w):
                    agreeing.add_(m.to(total.dtype), alpha=wi)
                agreeing[agreeing == 0] = 1
                scale = math.fsum(w) / agreeing
                deltas = [d * scale for d in deltas]
        return [pivot + d for d in deltas]


def merge_transformed(merger: Any, name: str, out_dir: Path, plan: ShardPlan,
                      advance: Callable[[int], None]) -> None:
    """`TensorMerger.run` for a floating tensor under a transform: blocks of 1/N the usual size, each ingredient's
    transformed block in memory at once, AME on them from the pivot, written in place.

    A pivot checkpoint without the tensor (a base without the fine-tunes' head) has no task vectors for it: that
    tensor is merged untransformed from the (weighted) mean, as without a transform.
    """
    info = merger.checkpoints[0].info(name)
    n = len(merger.checkpoints)
    blocks = row_blocks(info.shape, max(1, _plan.BLOCK_ELEMENTS // n))
    source = merger.checkpoints[merger.pivot] if isinstance(merger.pivot, int) else merger.pivot
    dtype = merger.compute_dtype
    if isinstance(source, str) or name not in source.tensors:  # "mean": a module folder the pivot lacks
        logger.debug("%s: the pivot has no such tensor: merged from the mean, without the transform", name)
        weights = relative_weights(merger.config.weights) or [1.0] * n

        def transformed(rows: Rows) -> tuple[torch.Tensor, list[torch.Tensor]]:
            xs = [merger._read(c, name, rows) for c in merger.checkpoints]
            return weighted_mean(xs.__getitem__, n, weights, dtype), xs
    else:
        transform = TensorTransform(merger, name, blocks, lambda rows: merger._read(source, name, rows))

        def transformed(rows: Rows) -> tuple[torch.Tensor, list[torch.Tensor]]:
            pivot = merger._read(source, name, rows)
            return pivot, transform.block(rows, pivot)
    lr = merger.config.lr
    kept: dict[Rows, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    if merger.config.relative_lr is not None:
        spreads = torch.empty(info.shape[0] if info.shape else 1, dtype=torch.float64)  # as TensorMerger.run
        # The first blocks whose pivot and n transformed blocks fit `max_memory` are kept for the steps, which start
        # with them: they are neither read nor transformed again (all of a tensor that fits); the same values.
        row = math.prod(info.shape[1:])
        sizes = [(n + 1) * (row * (r[1] - r[0]) if r else info.numel) for r in blocks]  # elements kept per block
        keep = leading_fit([size * dtype.itemsize for size in sizes], merger.max_memory, 0)
        store = _Kept(sum(sizes[:keep]), dtype, merger.device)
        for k, rows in enumerate(blocks):
            pivot, xs = transformed(rows)
            (spreads[rows[0]:rows[1]] if rows else spreads).copy_(row_spreads(xs.__getitem__, n, pivot)[1].reshape(-1))
            if k < keep:  # row_spreads modifies neither: the steps take them as they are
                kept[rows] = store.put(pivot), store.put_all(xs)
        lr = relative_lr_value(merger.config.relative_lr, spread_total([spreads]), n * info.numel)
    for rows in blocks:
        pivot, xs = kept.pop(rows) if rows in kept else transformed(rows)
        merged = pivot if lr == 0.0 else ame_block(xs.__getitem__, pivot, merger.config, merger.order, lr,
                                                     own_pivot=True)
        merger._write(out_dir, plan, name, rows[0] if rows else 0, merged.cpu())
        advance(info.nbytes * (rows[1] - rows[0]) // info.shape[0] if rows else info.nbytes)


class _Kept:
    """Tensors kept across a pass, copied into one buffer allocated before it. Kept as they were computed, they sat
    in the heap between the pass's temporaries and left holes that later, larger temporaries could not reuse: a
    DARE merge of 4 x 134M fp32 with 128 MiB kept peaked at 546 MiB, against 280 MiB keeping nothing."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.buffer = torch.empty(numel, dtype=dtype, device=device)
        self.used = 0

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` in the buffer (a view of it, of `t`'s shape)."""
        view = self.buffer[self.used:self.used + t.numel()].view(t.shape)
        self.used += t.numel()
        return view.copy_(t)

    def put_all(self, ts: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """`put` of each, in order."""
        return [self.put(t) for t in ts]
