"""A token-indexed tensor of ingredients whose vocabularies differ (DESIGN §3, Vocabulary): its rows matched by
token, each group of rows that the same ingredients own merged by AME over exactly those owners."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ._keeping import leading_fit
from .engine import ame_block
from .errors import IncompatibleCheckpointsError
from .plan import ShardPlan, index_runs, tensor_blocks
from .spread import relative_lr_value, row_spreads, spread_total
from .vocabulary import VocabularyPlan
from .weights import weighted_mean


def merge_token_rows(merger: Any, name: str, out_dir: Path, plan: ShardPlan,
                     advance: Callable[[int], None]) -> None:
    """A token-indexed tensor whose rows are matched by token (DESIGN §3, Vocabulary): the output rows
    owned by the same ingredients form a group, and each group runs AME over exactly its owners, in
    their order, block by block of rows; so the soup of a row is the mean over the ingredients that
    have its token. The pivot of a row: the pivot ingredient's row if it has the token, else the mean
    of the owners (a pivot checkpoint with another vocabulary: the mean too).

    Args:
        merger: the run's `TensorMerger` (its `vocab` set).
        name: the token-indexed tensor.
        out_dir: the staging directory.
        plan: the output's `ShardPlan`.
        advance: called with the bytes of output done.

    Raises:
        CheckpointError: as `TensorMerger.run`.
    """
    vocab = merger.vocab
    assert vocab is not None
    if merger.config.transform != "none":
        raise IncompatibleCheckpointsError(f"transform {merger.config.transform} needs one vocabulary; {name!r} has "
                                           "token rows that differ between the ingredients: merge without it")
    info = merger.checkpoints[0].info(name)
    columns = name in vocab.columns  # [1, vocab] (BART's final_logits_bias): whole tensors, seen as [vocab, 1]
    shape = (vocab.size, 1) if columns else (vocab.size, *info.shape[1:])
    if columns:
        flat = {i: merger._read(c, name, None).reshape(-1, 1) for i, c in enumerate(merger.checkpoints)}
        whole = torch.empty(shape, dtype=merger.compute_dtype)
    per_block = max(1, (tensor_blocks(shape, merger.device)[0] or (0, vocab.size))[1])
    groups = [(owners, rows[k:k + per_block]) for owners, rows in vocab.groups() for k in range(0, len(rows), per_block)]
    lr = merger.config.lr

    def gather(owners: Sequence[int], rows: Sequence[int]) -> dict[int, torch.Tensor]:
        return _gather_columns(flat, vocab, owners, rows) if columns else _gather_owners(merger, name, owners, rows)

    kept: dict[int, dict[int, torch.Tensor]] = {}  # groups the spread pass read, kept for the steps
    if merger.config.relative_lr is not None:
        # One float64 per row, made before the first group (as `TensorMerger.run` does).
        spreads, done = torch.empty(sum(len(rows) for _, rows in groups), dtype=torch.float64), 0
        counts = [len(owners) * len(rows) * math.prod(shape[1:]) for owners, rows in groups]
        sizes = [count * merger.compute_dtype.itemsize for count in counts]
        # Every group when all fit --max-memory (each input byte read once); else the first ones that fit beside
        # the group being read, and the rest is read again for the steps (as `_keeping.kept_head`).
        keep = leading_fit(sizes, merger.max_memory, 0 if sum(sizes) <= merger.max_memory else max(sizes))
        if columns:
            keep = 0  # a [1, vocab] tensor is in memory whole already
        elif keep < len(groups):
            merger.read_again[name] = sum(sizes)
        for k, (owners, rows) in enumerate(groups):
            blocks = gather(owners, rows)
            spread = row_spreads(lambda j: blocks[owners[j]], len(owners), _row_pivot(merger, owners, rows, blocks))[1]
            spreads[done:done + len(rows)].copy_(spread.reshape(-1))
            done += len(rows)
            if k < keep:
                kept[k] = blocks
        lr = relative_lr_value(merger.config.relative_lr, spread_total([spreads]), sum(counts))
    row_bytes = info.nbytes // max(1, info.shape[-1] if columns else info.shape[0])
    for k, (owners, rows) in enumerate(groups):
        blocks = kept.pop(k, None) or gather(owners, rows)  # kept: the engine never modifies what it loads
        order = [[i for i in epoch if i in owners] for epoch in merger.order]
        pivot = _row_pivot(merger, owners, rows, blocks)
        if pivot is None and merger.weights is not None:
            pivot = weighted_mean(lambda j: blocks[owners[j]], len(owners), [merger.weights[i] for i in owners],
                                  merger.compute_dtype)
        elif pivot is None:
            mean = sum(blocks[i].double() for i in owners) / len(owners)
            pivot = mean.to(merger.compute_dtype)
        merged = pivot if lr == 0.0 else ame_block(blocks.__getitem__, pivot, merger.config, order, lr)
        merged = merged.cpu()
        if columns:
            whole[rows] = merged
        for start, stop in [] if columns else index_runs(rows):
            offset = rows.index(start)
            merger._write(out_dir, plan, name, start, merged[offset:offset + stop - start])
        advance(row_bytes * len(rows))
    if columns:
        merger._write(out_dir, plan, name, 0, whole.reshape(vocab.shape_of(name, info.shape)))


def _gather_columns(flat: dict[int, torch.Tensor], vocab: VocabularyPlan, owners: Sequence[int],
                    rows: Sequence[int]) -> dict[int, torch.Tensor]:
    """Each owner's values for output `rows` of a [1, vocab] tensor read whole (and seen as [vocab, 1])."""
    return {i: flat[i][[vocab.rows[i][r] for r in rows]] for i in owners}


def _gather_owners(merger: Any, name: str, owners: Sequence[int], rows: Sequence[int]) -> dict[int, torch.Tensor]:
    """Each owner's rows for output `rows` (read as runs of consecutive rows), in the compute dtype."""
    assert merger.vocab is not None
    out = {}
    for i in owners:
        source = [merger.vocab.rows[i][r] for r in rows]
        parts = [merger._read(merger.checkpoints[i], name, run) for run in index_runs(source)]
        out[i] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out


def _row_pivot(merger: Any, owners: Sequence[int], rows: Sequence[int],
               blocks: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """The pivot ingredient's rows when it owns them; None (the mean of the owners) otherwise."""
    if isinstance(merger.pivot, int) and merger.pivot in owners:
        return blocks[merger.pivot].clone()
    return None
