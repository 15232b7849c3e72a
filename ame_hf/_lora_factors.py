"""One module's LoRA factors: its merged-minus-base weight delta factored by a truncated SVD (exact for small
matrices, randomized for big ones), and the relative error of the factors as they are stored."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .records import Ingredient

# At or below this smaller dimension the SVD is exact; above it torch.svd_lowrank (see `factor_delta`).
EXACT_SVD_MAX_DIM = 1024
# Without a rank cap, the sketch of a big delta: kept when the delta's rank is below it.
PROBE_RANK = 128
# torch.svd_lowrank's oversampling and power iterations, and the seed of its random start (fixed: same bytes).
OVERSAMPLE = 10
POWER_ITERATIONS = 4
SEED = 0
# Rows of the residual `delta - B @ A` formed at once when measuring the error (memory: one tensor's size).
ERROR_ROWS = 4096


@dataclass(frozen=True)
class Factors:
    """`delta ≈ B @ A` (scaling 1).

    Attributes:
        B: `out x rank`, in the stored dtype.
        A: `rank x in`, in the stored dtype.
        error: `||delta - B @ A||_F / ||delta||_F`, measured in float64 with the stored factors.
        method: `exact SVD` or `randomized SVD`.
    """

    B: torch.Tensor
    A: torch.Tensor
    error: float
    method: str

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class AdapterSummary:
    """What an adapter output holds: each factored module's `Factors` (by module name), the modules saved whole,
    the size of `adapter_model.safetensors`, the base, and the tied tensors saved as copies."""

    factors: dict[str, Factors] = field(default_factory=dict)
    saved: list[str] = field(default_factory=list)
    nbytes: int = 0
    base: Ingredient | None = None
    tied: dict[str, str] = field(default_factory=dict)  # a saved tensor tied to a stored one -> the stored one


def choose_rank(s: torch.Tensor, total: float, *, cap: int | None, energy: float | None, floor: float) -> int:
    """The rank kept of singular values `s` (descending, float64).

    Args:
        s: the (leading) singular values of the delta.
        total: the delta's squared Frobenius norm (the sum of all its squared singular values).
        cap: the largest rank (`adapter_rank`), or None.
        energy: keep the fewest values whose squares reach this fraction of `total`, or None.
        floor: values at or below this are float rounding of the merged weights, never kept.

    Returns:
        At least 1.

    >>> choose_rank(torch.tensor([4.0, 2.0, 1e-9], dtype=torch.float64), 20.0, cap=None, energy=None, floor=1e-6)
    2
    >>> choose_rank(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64), 21.0, cap=None, energy=0.9, floor=0.0)
    2
    """
    rank = int((s > floor).sum())
    if energy is not None and total > 0:
        reached = torch.cumsum(s * s, 0) >= energy * total * (1 - 1e-12)
        rank = min(rank, int(reached.nonzero()[0]) + 1 if reached.any() else len(s))
    if cap is not None:
        rank = min(rank, cap)
    return max(rank, 1)


def factor_delta(delta: torch.Tensor, dtype: torch.dtype, *, cap: int | None, energy: float | None,
                 floor: float) -> Factors:
    """Factor one module's delta.

    Args:
        delta: merged minus base, float64, `out x in`.
        dtype: the dtype the factors are stored in.
        cap: `adapter_rank`, or None.
        energy: `adapter_energy`, or None.
        floor: the float rounding of the merged weights: rounding moves each weight by at most half an ulp, so by a
            matrix of Frobenius norm at most `eps * ||merged||_F`, which bounds the singular values it adds.

    Returns:
        The `Factors`.
    """
    rows, cols = delta.shape
    total = float(torch.linalg.vector_norm(delta)) ** 2
    small = min(rows, cols)
    rank, method = 0, "randomized SVD"
    if small > EXACT_SVD_MAX_DIM:
        # A rank cap sets the sketch's size; without one, a sketch of PROBE_RANK is kept when the delta's rank (or
        # energy) is reached within it (a LoRA soup's delta), else the SVD is exact.
        wanted = cap if cap is not None else PROBE_RANK
        if wanted + OVERSAMPLE < small // 2:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SEED)
                u, s, v = torch.svd_lowrank(delta, q=wanted + OVERSAMPLE, niter=POWER_ITERATIONS)
            vh = v.T
            rank = choose_rank(s, total, cap=wanted, energy=energy, floor=floor)
            if cap is None and rank == wanted:  # not reached within the sketch
                rank = 0
    if not rank:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        method = "exact SVD"
        rank = choose_rank(s, total, cap=cap, energy=energy, floor=floor)
    root = s[:rank].sqrt()
    b = (u[:, :rank] * root).to(dtype).contiguous()
    a = (root[:, None] * vh[:rank]).to(dtype).contiguous()
    return Factors(B=b, A=a, error=relative_error(delta, b, a, total), method=method)


def relative_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor, total: float | None = None) -> float:
    """`||delta - b @ a||_F / ||delta||_F` in float64, `ERROR_ROWS` rows of the residual at a time.

    >>> d = torch.eye(3, dtype=torch.float64)
    >>> round(relative_error(d, d[:, :2], d[:2]), 12)  # one of three equal directions left out: sqrt(1/3)
    0.57735026919
    """
    total = float(torch.linalg.vector_norm(delta)) ** 2 if total is None else total
    a64, residual = a.double(), 0.0
    for start in range(0, delta.shape[0], ERROR_ROWS):
        part = delta[start:start + ERROR_ROWS] - b[start:start + ERROR_ROWS].double() @ a64
        residual += float((part * part).sum())
    return math.sqrt(residual / total) if total > 0 else 0.0
