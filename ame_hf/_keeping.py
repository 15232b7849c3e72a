"""What of one tensor a merge keeps in memory within `--max-memory`: every ingredient's blocks (each input
byte read once), in their stored dtype when only that fits, and the relative lr's pivots beside them."""

from __future__ import annotations

import logging
from typing import Sequence

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


def keeping(checkpoints: Sequence[Checkpoint], name: str, passes: int, compute: torch.dtype, max_memory: int, *,
            relative: bool) -> tuple[dict | None, dict | None, torch.dtype]:
    """What of tensor `name` is kept: every ingredient's blocks when they fit `max_memory` (in the compute dtype,
    else in the stored one), and with a relative lr the spread's pivots too when they fit beside them. A tensor
    whose blocks do not fit keeps nothing: its spread pass reads it once more and its means are computed twice
    (keeping the pivots alone would hold a float32 copy of the tensor: the 134M model's embedding took the
    merge's peak memory from about 390 to 510 MiB, to save about 0.1 s).

    Args:
        checkpoints: the ingredients.
        name: the tensor.
        passes: how many times the merge reads each block (one: nothing is worth keeping).
        compute: the compute dtype.
        max_memory: the bytes a tensor's kept blocks may take.
        relative: the learning rate is relative (a spread pass comes first).

    Returns:
        (an empty dict for the kept blocks or None, an empty dict for the pivots or None, the kept blocks' dtype).
    """
    if passes <= 1:  # one pass reads each block once anyway (the soup): keeping them would only cost memory
        return None, None, compute
    numel = checkpoints[0].info(name).numel
    pivot_bytes = numel * compute.itemsize
    n, dtype = len(checkpoints), compute
    if n * numel * dtype.itemsize > max_memory:
        dtype = keep_dtype(checkpoints, name, compute)  # half the memory for bfloat16 blocks, converted on load
    blocks_bytes = n * numel * dtype.itemsize
    if blocks_bytes <= max_memory:
        return {}, {} if relative and blocks_bytes + pivot_bytes <= max_memory else None, dtype
    logger.debug("%s: %d copies of %.1f MB exceed --max-memory: kept one block at a time, so the learning-rate "
                 "spread reads it once more", name, n, numel * dtype.itemsize / 1e6)
    return None, None, dtype
