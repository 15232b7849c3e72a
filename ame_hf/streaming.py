"""The per-tensor driver: for each tensor (in blocks of rows), read every ingredient's block, run the
engine, write the result in place, with an I/O thread and a writer thread overlapping reads, compute and writes."""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint
from .config import AmeConfig
from ._keeping import block_loader, keeping
from ._spread_pass import spread_pass
from ._token_rows import merge_token_rows
from .engine import ame_block
from .errors import CheckpointError, IncompatibleCheckpointsError
from .plan import Rows, ShardPlan, tensor_blocks
from .spread import mean_of, relative_lr_value, spread_total
from .vocabulary import VocabularyPlan
from .weights import relative_weights, weighted_mean
from .writer import WrittenDigests, write_rows

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
# Ingredient blocks of one tensor kept in memory so that each input byte is read once (for the spread,
# the mean pivot and every step and epoch); a tensor whose N copies exceed it keeps its first blocks that fit
# (`_keeping.kept_head`) and reads the rest again.
DEFAULT_MAX_MEMORY = 128 * 2**20


class TensorMerger:
    """Runs AME for one tensor name over all its blocks and writes the result in place.

    While `stream_tensors` lends it an I/O thread (`io`) and a writer thread (`writer`), the next ingredient block
    is read while the engine computes on this one, and each finished block is written while the next is computed
    and read: the reads, the writes and the optimizer overlap, and at most one extra block is held in memory each
    way. Without them (None) it reads and writes in line.

    Args:
        checkpoints: the opened ingredients, under the output's tensor names.
        pivot: `mean`, an ingredient index, or a pivot `Checkpoint`.
        config: the resolved `AmeConfig`.
        order: the ingredient indices of each epoch (`engine.ingredient_order`).
        device: where the engine computes.
        vocab: with differing vocabularies, how token-indexed rows are matched (`merge_token_rows`).
        vocab_keys: the token-indexed tensors.
        max_memory: bytes of one tensor's ingredient blocks kept so that each input byte is read once.
    """

    def __init__(self, checkpoints: list[Checkpoint], pivot: Any, config: AmeConfig,
                 order: list[list[int]], device: torch.device, *,
                 vocab: VocabularyPlan | None = None, vocab_keys: frozenset[str] = frozenset(),
                 max_memory: int = DEFAULT_MAX_MEMORY) -> None:
        self.checkpoints = checkpoints
        self.max_memory = max_memory
        self.vocab, self.vocab_keys = vocab, vocab_keys
        self.pivot = pivot  # "mean", an ingredient index, or a Checkpoint
        self.config = config
        self.order = order
        self.device = device
        self.compute_dtype = getattr(torch, config.compute_dtype)
        self.soup = config.is_soup
        self.weights = relative_weights(config.weights)  # None: unweighted
        self.io: ThreadPoolExecutor | None = None  # lent by `stream_tensors`
        self.writer: ThreadPoolExecutor | None = None  # lent by `stream_tensors`
        self._pending_write: Future | None = None
        self.digests: WrittenDigests | None = None  # while a journal records: each tensor's sha256 as written
        # Tensors read more than once because their ingredient blocks exceed `max_memory`: name -> the budget that
        # would have kept them (for the merge's closing note).
        self.read_again: dict[str, int] = {}
        # The ingredient indices the engine reads for one block, in order (batches are consecutive).
        self._ame_reads = [i for epoch in order for i in epoch]

    def _read(self, ckpt: Checkpoint, name: str, rows: Rows, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = ckpt.read(name, rows, dtype=dtype or self.compute_dtype).to(self.device)
        # A plain sum is one fast pass with no temporary, and NaN/Inf propagate into it; only when
        # it is not finite (a NaN, an Inf, or a rare overflow of huge values) is each value checked.
        if (not self.config.allow_nonfinite and not math.isfinite(float(t.sum()))
                and not bool(torch.isfinite(t).all())):
            raise CheckpointError(
                f"{ckpt.name}: tensor {name!r} contains NaN or Inf; fix that checkpoint, or pass "
                "allow_nonfinite=True to merge it anyway", path=ckpt.path, tensor=name, field="allow_nonfinite"
            )
        return t

    def _loader(self, name: str, rows: Rows, expected: Sequence[int] = (),
                dtype: torch.dtype | None = None) -> Callable[[int], torch.Tensor]:
        """`load(i)`: ingredient i's block (in `dtype`, default the compute dtype). The engine asks in the
        `expected` order, so each read is started one ahead in the I/O thread."""
        if self.io is None or not expected:
            return lambda i: self._read(self.checkpoints[i], name, rows, dtype)
        io, upcoming = self.io, list(expected)
        pos = 0
        ahead = io.submit(self._read, self.checkpoints[upcoming[0]], name, rows, dtype)

        def load(i: int) -> torch.Tensor:
            nonlocal pos, ahead
            assert pos < len(upcoming) and upcoming[pos] == i, "the engine read out of the planned order"
            current = ahead
            pos += 1
            if pos < len(upcoming):
                ahead = io.submit(self._read, self.checkpoints[upcoming[pos]], name, rows, dtype)
            return current.result()

        return load

    # Set by `in_memory.merge_state_dict`: the output tensors go into this dict instead of the shard files.
    into: dict[str, torch.Tensor] | None = None

    def _write(self, out_dir: Path, plan: ShardPlan, name: str, row: int, values: torch.Tensor) -> None:
        if self.into is not None:  # the values `write_rows` would write, in the same dtype, into the tensor
            dtype, shape, _, _ = plan.location[name].entries[name]
            if name not in self.into:
                self.into[name] = torch.empty(shape, dtype=dtype)
            target = self.into[name]
            start = row * math.prod(shape[1:])
            target.view(-1)[start:start + values.numel()].copy_(values.to(dtype).reshape(-1))
            return
        if self.writer is None:
            write_rows(out_dir, plan, name, row, values, self.digests)
            return
        self.flush()  # at most one block waiting to be written
        self._pending_write = self.writer.submit(write_rows, out_dir, plan, name, row, values, self.digests)

    def flush(self) -> None:
        """Wait for the last write.

        Raises:
            OSError: the write failed.
        """
        pending, self._pending_write = self._pending_write, None
        if pending is not None:
            pending.result()

    def _pivot_block(self, name: str, rows: Rows) -> torch.Tensor | None:
        """The pivot's values for a block; None for `mean` (computed from the ingredients), and for a
        tensor the pivot checkpoint lacks (a base model without the fine-tunes' head)."""
        if self.pivot == "mean":
            return None
        source = self.checkpoints[self.pivot] if isinstance(self.pivot, int) else self.pivot
        return self._read(source, name, rows) if name in source.tensors else None

    def _mean_block(self, load: Callable[[int], torch.Tensor]) -> torch.Tensor:
        if self.weights is not None:
            return weighted_mean(load, len(self.checkpoints), self.weights, self.compute_dtype)
        return mean_of(load, len(self.checkpoints))

    def run(self, name: str, out_dir: Path, plan: ShardPlan, advance: Callable[[int], None]) -> None:
        """Merge tensor `name` block by block and write it into its shard (integer tensors are copied, and
        must be equal; token-indexed ones go by token).

        Args:
            name: the tensor.
            out_dir: the staging directory, with the shard files made.
            plan: the output's `ShardPlan`.
            advance: called with the bytes of output done, as blocks finish.

        Raises:
            CheckpointError: an ingredient holds NaN or Inf (unless `allow_nonfinite`), or cannot be read.
            IncompatibleCheckpointsError: an integer tensor differs between the ingredients.
        """
        info = self.checkpoints[0].info(name)
        if self.vocab is not None and name in self.vocab_keys:
            merge_token_rows(self, name, out_dir, plan, advance)
            return
        if not info.dtype.is_floating_point:
            self._copy_exact(name, out_dir, plan)
            advance(info.nbytes)
            return
        if self.config.transform != "none":
            from .transforms import merge_transformed

            merge_transformed(self, name, out_dir, plan, advance)
            return
        blocks = tensor_blocks(info.shape, self.device)
        n = len(self.checkpoints)
        lr = self.config.lr
        relative = self.config.relative_lr is not None
        passes = relative + (self.pivot == "mean" and not self.soup) + (len(self.order) if lr != 0.0 else 0)
        keep = keeping(self.checkpoints, name, blocks, passes, self.compute_dtype, self.max_memory, relative=relative)
        if keep.read_again:
            self.read_again[name] = keep.read_again
        if relative:
            # The spread needs the whole tensor before the first step. Each block's pivot (the mean: the costly
            # part) is computed here, and kept for the steps when `max_memory` allows.
            spreads = spread_pass(self, name, blocks, keep, info.shape)
            lr = relative_lr_value(self.config.relative_lr, spread_total([spreads]), n * info.numel)
        pivots = keep.pivots
        for rows in blocks:
            pivot = pivots.pop(rows, None) if pivots else None
            pivot = self._pivot_block(name, rows) if pivot is None else pivot
            mean_pass = pivot is None and not self.soup
            reads = [*(range(n) if mean_pass else ()), *(self._ame_reads if lr != 0.0 else ())]
            kept = keep.of(rows)
            load = block_loader(self, kept, name, rows, reads, info.shape, keep.dtype)
            if pivot is None and self.soup:
                # The soup's first step (SGD, lr 1) replaces w by the first ingredient whatever the
                # pivot; from zeros that step is exact, so the mean pass would only cost a read.
                pivot = torch.zeros(self._block_shape(info.shape, rows), dtype=self.compute_dtype, device=self.device)
            elif pivot is None:
                pivot = self._mean_block(load)
            # lr 0 (relative lr of identical ingredients): every optimizer would stay at the pivot.
            # Every pivot here is a fresh tensor of this block alone: the engine may step it in place.
            merged = pivot if lr == 0.0 else ame_block(load, pivot, self.config, self.order, lr, own_pivot=True)
            self._write(out_dir, plan, name, rows[0] if rows else 0, merged.cpu())
            if kept is not None:  # this block is done: its kept copies are not needed again
                for i in range(n):
                    kept.pop((rows, i), None)
            advance(info.nbytes * (rows[1] - rows[0]) // info.shape[0] if rows else info.nbytes)

    @staticmethod
    def _block_shape(shape: tuple[int, ...], rows: Rows) -> tuple[int, ...]:
        return shape if rows is None else (rows[1] - rows[0], *shape[1:])

    def _copy_exact(self, name: str, out_dir: Path, plan: ShardPlan) -> None:
        first = self.checkpoints[0].read(name)
        for other in self.checkpoints[1:]:
            if not torch.equal(first, other.read(name)):
                raise IncompatibleCheckpointsError(
                    f"non-floating tensor {name!r} differs between {self.checkpoints[0].name} and {other.name}; "
                    "integer buffers must be equal in all ingredients"
                )
        self._write(out_dir, plan, name, 0, first)


def _output_nbytes(merger: TensorMerger, name: str) -> int:
    """Bytes of `name` in the output: a token-indexed tensor has the merged vocabulary's rows, not the first
    ingredient's (the progress bar overshot its total when another ingredient added tokens)."""
    info = merger.checkpoints[0].info(name)
    if merger.vocab is not None and name in merger.vocab_keys and info.shape:
        return info.nbytes // max(1, info.shape[-1] if name in merger.vocab.columns else info.shape[0]) * merger.vocab.size
    return info.nbytes


def stream_tensors(merger: TensorMerger, names: Sequence[str], staging: Path, plan: ShardPlan, *, show: bool,
                   callback: ProgressCallback | None = None,
                   on_done: Callable[[str, str | None], None] | None = None) -> None:
    """Merge and write `names` (this process's share) with a progress bar in bytes of output.

    Args:
        merger: the run's `TensorMerger` (lent an I/O thread and a writer thread for the duration).
        names: the tensors to merge, in order.
        staging: the staging directory, with the shard files made.
        plan: the output's `ShardPlan`.
        show: show the progress bar.
        callback: called as `callback(done_bytes, total_bytes)` as tensors finish.
        on_done: called (in the writer thread) with each tensor's name once its bytes are written, and the sha256 of
            those bytes as written, or None where they were not written in order (the journal).

    Raises:
        CheckpointError, IncompatibleCheckpointsError: as `TensorMerger.run`; OSError: a shard cannot be written.
    """
    sizes = {n: _output_nbytes(merger, n) for n in names}
    total = sum(sizes.values())
    done = 0
    # Reads and writes each have a thread: a write (into new page-cache pages, with the sha256) can take longer than
    # its block's reads, and in one thread the next reads waited behind it.
    io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ame-hf-io")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ame-hf-write")
    merger.io, merger.writer = io, writer
    merger.digests = WrittenDigests() if on_done is not None else None  # nothing to hash for no journal
    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="AME", disable=not show) as bar:
            def advance(nbytes: int) -> None:
                nonlocal done
                done += nbytes
                bar.update(nbytes)
                if callback is not None:
                    callback(done, total)

            recorded: Future | None = None
            for name in names:
                bar.set_postfix_str(name[-40:], refresh=False)
                merger.run(name, staging, plan, advance)
                if on_done is not None:  # queued after the tensor's last write: the one writer thread keeps the order
                    if recorded is not None:
                        recorded.result()
                    recorded = writer.submit(_after_write, merger._pending_write, on_done, name,
                                         lambda name=name: merger.digests.take(name, plan.nbytes(name)))
            merger.flush()
            if recorded is not None:
                recorded.result()
    finally:
        merger.io = merger.writer = None
        io.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
        merger.digests = None


def _after_write(write: Future | None, on_done: Callable[[str, str | None], None], name: str,
                 digest: Callable[[], str | None]) -> None:
    """`on_done(name, digest())` in the writer thread once the tensor's last write is done, never after a failed one
    (a full disk): its bytes are then not what the merge computed, and a journal must not vouch for them."""
    if write is not None:
        write.result()
    on_done(name, digest())
