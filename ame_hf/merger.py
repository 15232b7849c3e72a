"""`merge`: resolve -> check -> plan -> engine -> writer -> finish, the one function behind the
CLI, the Python API and the Space (DESIGN §3)."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .checkpoint import Checkpoint
from .compat import CompatibilityReport, check_compatibility
from .config import AmeConfig, parse_size
from .engine import ame_block, ingredient_order, relative_lr_value, spread_sum
from .errors import (CheckpointError, IncompatibleCheckpointsError, InvalidConfigError, OutputError)
from .hub import SIDE_PATTERNS, Ingredient, resolve_refs
from .writer import (ShardPlan, check_output_dir, create_shard_files, describe_os_error, make_staging_dir,
                     plan_shards, publish, write_index, write_rows)

logger = logging.getLogger(__name__)

# Tensors larger than this many elements are processed in slices of rows. Every supported
# optimizer is element-wise, so slicing changes no value; it bounds memory by the slice. The
# slicing depends only on the shape, so any split over processes computes the same bytes.
SLICE_ELEMENTS = int(os.environ.get("AME_HF_SLICE_ELEMENTS", 1 << 20))

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class MergeResult:
    """What `merge` produced.

    Attributes:
        path: the output directory (a `from_pretrained`-loadable model).
        config: the fully resolved `AmeConfig` that was run.
        ingredients: the resolved ingredients, in the user's order (repo ID + resolved sha).
        order: the ingredient indices used in each epoch.
        pivot: the pivot (`mean`, an index, or the resolved pivot checkpoint).
        seconds: wall time of the merge.
        device: the device the optimizer ran on (e.g. `cpu`, `cuda:0`).
    """

    path: Path
    config: AmeConfig
    ingredients: list[Ingredient]
    order: list[list[int]]
    pivot: Any = "mean"
    seconds: float = 0.0
    report: CompatibilityReport | None = field(default=None, compare=False, repr=False)
    device: str = field(default="cpu", compare=False)


def open_checkpoints(ingredients: Sequence[Ingredient]) -> list[Checkpoint]:
    return [Checkpoint(i.path, name=i.ref) for i in ingredients]


def resolve_all(refs: Sequence[str], token: str | None = None) -> list[Ingredient]:
    """Resolve every reference (downloading Hub repos), in the user's order."""
    return resolve_refs(refs, token=token)


# On a GPU, slices 16x larger keep the device busy; memory there is bounded all the same.
GPU_SLICE_FACTOR = 16


def row_slices(shape: Sequence[int], elements: int | None = None) -> list[tuple[int, int] | None]:
    """Row ranges covering a tensor; `[None]` when it is small enough to take whole."""
    elements = elements or SLICE_ELEMENTS
    numel = 1
    for d in shape:
        numel *= d
    if not shape or numel <= elements:
        return [None]
    row = max(1, numel // shape[0])
    step = max(1, elements // row)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def assign_to_processes(sizes: dict[str, int], count: int) -> list[list[str]]:
    """Split tensors between processes, balanced by bytes (largest first onto the lightest)."""
    loads = [0] * count
    parts: list[list[str]] = [[] for _ in range(count)]
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        i = min(range(count), key=lambda j: (loads[j], j))
        parts[i].append(name)
        loads[i] += size
    return [sorted(p) for p in parts]


def _output_dtype(config: AmeConfig, stored: torch.dtype) -> torch.dtype:
    if not stored.is_floating_point or config.dtype == "auto":
        return stored
    return getattr(torch, config.dtype)


class _TensorMerger:
    """Runs AME for one tensor name over all its slices and writes the result in place.

    With an I/O thread (`io`), the next ingredient block is read while the engine computes on
    this one, and each finished block is written while the next is computed: the reads, the
    writes and the optimizer overlap, and at most one extra block is held in memory each way.
    """

    def __init__(self, checkpoints: list[Checkpoint], pivot: Any, config: AmeConfig,
                 order: list[list[int]], device: torch.device, io: ThreadPoolExecutor | None = None) -> None:
        self.checkpoints = checkpoints
        self.pivot = pivot  # "mean", an ingredient index, or a Checkpoint
        self.config = config
        self.order = order
        self.device = device
        self.compute_dtype = getattr(torch, config.compute_dtype)
        self.soup = config.is_soup
        self.io = io
        self._pending_write: Future | None = None
        # The ingredient indices the engine reads for one block, in order (batches are consecutive).
        self._ame_reads = [i for epoch in order for i in epoch]

    def _read(self, ckpt: Checkpoint, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        t = ckpt.read(name, rows, dtype=self.compute_dtype).to(self.device)
        # A plain sum is one fast pass with no temporary, and NaN/Inf propagate into it; only when
        # it is not finite (a NaN, an Inf, or a rare overflow of huge values) is each value checked.
        if (not self.config.allow_nonfinite and not math.isfinite(float(t.sum()))
                and not bool(torch.isfinite(t).all())):
            raise CheckpointError(
                f"{ckpt.name}: tensor {name!r} contains NaN or Inf; fix that checkpoint, or pass "
                "--allow-nonfinite to merge it anyway"
            )
        return t

    def _loader(self, name: str, rows: tuple[int, int] | None,
                expected: Sequence[int] = ()) -> Callable[[int], torch.Tensor]:
        """`load(i)`: ingredient i's block. The engine asks in the `expected` order, so each read is
        started one ahead in the I/O thread."""
        if self.io is None or not expected:
            return lambda i: self._read(self.checkpoints[i], name, rows)
        io, upcoming = self.io, list(expected)
        pos = 0
        ahead = io.submit(self._read, self.checkpoints[upcoming[0]], name, rows)

        def load(i: int) -> torch.Tensor:
            nonlocal pos, ahead
            assert pos < len(upcoming) and upcoming[pos] == i, "the engine read out of the planned order"
            current = ahead
            pos += 1
            if pos < len(upcoming):
                ahead = io.submit(self._read, self.checkpoints[upcoming[pos]], name, rows)
            return current.result()

        return load

    def _write(self, out_dir: Path, plan: ShardPlan, name: str, row: int, values: torch.Tensor) -> None:
        if self.io is None:
            write_rows(out_dir, plan, name, row, values)
            return
        self.flush()  # at most one block waiting to be written
        self._pending_write = self.io.submit(write_rows, out_dir, plan, name, row, values)

    def flush(self) -> None:
        """Wait for the last write (raising its error, if any)."""
        pending, self._pending_write = self._pending_write, None
        if pending is not None:
            pending.result()

    def _pivot_block(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor | None:
        """The pivot's values for a block; None for `mean` (computed from the ingredients)."""
        if self.pivot == "mean":
            return None
        source = self.checkpoints[self.pivot] if isinstance(self.pivot, int) else self.pivot
        return self._read(source, name, rows)

    def _mean_block(self, load: Callable[[int], torch.Tensor]) -> torch.Tensor:
        total = load(0).double()
        for i in range(1, len(self.checkpoints)):
            total.add_(load(i))  # accumulates in float64 without a float64 copy of each ingredient
        return total.div_(len(self.checkpoints)).to(self.compute_dtype)

    def run(self, name: str, out_dir: Path, plan: ShardPlan, advance: Callable[[int], None]) -> None:
        info = self.checkpoints[0].info(name)
        if not info.dtype.is_floating_point:
            self._copy_exact(name, out_dir, plan)
            advance(info.nbytes)
            return
        slices = row_slices(info.shape, SLICE_ELEMENTS * (GPU_SLICE_FACTOR if self.device.type == "cuda" else 1))
        n = len(self.checkpoints)
        lr = self.config.lr
        cached_pivot = None
        if self.config.relative_lr is not None:
            squared = 0.0
            for rows in slices:
                s1, dist = spread_sum(self._loader(name, rows, range(n)), n, self._pivot_block(name, rows))
                squared += dist
                if len(slices) == 1 and self.pivot == "mean":
                    cached_pivot = (s1 / n).to(self.compute_dtype)
                del s1
            lr = relative_lr_value(self.config.relative_lr, squared, n * info.numel)
        for rows in slices:
            pivot = cached_pivot if cached_pivot is not None else self._pivot_block(name, rows)
            mean_pass = pivot is None and not self.soup
            reads = [*(range(n) if mean_pass else ()), *(self._ame_reads if lr != 0.0 else ())]
            load = self._loader(name, rows, reads)
            if pivot is None and self.soup:
                # The soup's first step (SGD, lr 1) replaces w by the first ingredient whatever the
                # pivot; from zeros that step is exact, so the mean pass would only cost a read.
                pivot = torch.zeros(self._block_shape(info.shape, rows), dtype=self.compute_dtype, device=self.device)
            elif pivot is None:
                pivot = self._mean_block(load)
            # lr 0 (relative lr of identical ingredients): every optimizer would stay at the pivot.
            merged = pivot if lr == 0.0 else ame_block(load, pivot, self.config, self.order, lr)
            self._write(out_dir, plan, name, rows[0] if rows else 0, merged.cpu())
            advance(info.nbytes * (rows[1] - rows[0]) // info.shape[0] if rows else info.nbytes)

    @staticmethod
    def _block_shape(shape: tuple[int, ...], rows: tuple[int, int] | None) -> tuple[int, ...]:
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


def _distributed_state(device: str | None):
    """(process index, process count, device, state-or-None) from accelerate when it matters.

    A plain single CPU process does not import accelerate (0.6 s of start-up) since accelerate
    would choose the CPU there too.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is not None:
        try:
            wanted = torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidConfigError(f"--device {device!r} is not a device name (e.g. cpu, cuda, cuda:1, mps)") from None
        if wanted.type == "cuda" and (not torch.cuda.is_available() or (wanted.index or 0) >= torch.cuda.device_count()):
            raise InvalidConfigError(f"--device {device}: no such CUDA device on this machine; use --device cpu")
        if wanted.type == "mps" and not torch.backends.mps.is_available():
            raise InvalidConfigError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    no_accelerator = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    cpu = device == "cpu" or (device is None and no_accelerator)
    if world <= 1 and cpu:
        return 0, 1, torch.device("cpu"), None
    from accelerate import PartialState

    # Without cpu=True accelerate ignores torchrun's WORLD_SIZE on a machine with no GPU and every
    # process would do the whole job.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if not cpu and device is None and torch.cuda.is_available() and local_world > torch.cuda.device_count():
        raise InvalidConfigError(
            f"launched {local_world} processes on this machine but it has {torch.cuda.device_count()} CUDA "
            "device(s); launch at most one process per GPU, or pass --device cpu"
        )
    state = PartialState(cpu=cpu)
    if state.num_processes != world:
        raise InvalidConfigError(
            f"launched as {world} processes but accelerate set up {state.num_processes}; "
            "launch with torchrun or `accelerate launch` and the same --device on every process"
        )
    chosen = torch.device(device) if device else state.device
    if chosen.type == "cuda" and chosen.index is None:
        # An explicit index: the I/O thread must use this process's GPU, not its own default (0).
        chosen = torch.device("cuda", torch.cuda.current_device())
    return state.process_index, state.num_processes, chosen, state


def config_digest(config: AmeConfig, ingredients: Sequence[Ingredient], pivot: Any) -> str:
    """A short hash of everything that determines the weights (stamped into every shard)."""
    payload = json.dumps({"config": config.to_dict(), "ingredients": [i.pinned_ref for i in ingredients],
                          "pivot": pivot.pinned_ref if isinstance(pivot, Ingredient) else pivot},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def merge(
    ingredients: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: AmeConfig | None = None,
    *,
    token: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callback: ProgressCallback | None = None,
    device: str | None = None,
    threads: int | None = None,
    command: str | None = None,
    **options: Any,
) -> MergeResult:
    """Merge checkpoints with AME and write a `from_pretrained`-loadable model to `out_dir`.

    Args:
        ingredients: local directories and/or Hub repo IDs (`org/name`, `org/name@revision`).
        out_dir: the output directory; written in a staging directory and moved into place at the end.
        config: an `AmeConfig`; keyword `options` (e.g. `optimizer="adamw", lr=1e-4`) override it.
        token: Hub token for private or gated repos (default: `HF_TOKEN` or the login cache).
        overwrite: replace a non-empty `out_dir`.
        progress: show a progress bar.
        callback: called as `callback(done_bytes, total_bytes)` as tensors finish.
        device: compute device (default: chosen by accelerate).
        threads: torch intra-op threads on the CPU during the merge (default 1: element-wise work on
            slices gains little from threads and stalls badly when another process shares the cores;
            use several processes with `torchrun` to use more cores).
        command: the command line as typed (the CLI passes it, tokens removed). Accepted for existing
            callers; the card's Reproduce command is built from the resolved result instead.

    Returns:
        A `MergeResult` with the output path, resolved config, ingredients and order.

    Raises:
        InvalidConfigError, IngredientNotFoundError, CheckpointError, IncompatibleCheckpointsError,
        OutputError, HubError (all `AmeError`s).

    >>> result = merge(["./expert-a", "./expert-b"], "merged", optimizer="sgd")  # doctest: +SKIP
    >>> result.path                                                             # doctest: +SKIP
    PosixPath('merged')
    """
    started = time.perf_counter()
    try:
        config = dataclasses.replace(config, **options) if config is not None else AmeConfig(**options)
    except TypeError as err:
        raise InvalidConfigError(f"invalid merge option: {err}") from None
    config = config.resolved()
    refs = [os.fspath(r) for r in ingredients]
    _validate_counts(refs, config)
    out = Path(out_dir)
    check_output_dir(out, overwrite)

    rank, world, compute_device, state = _distributed_state(device)
    if threads is not None and threads < 1:
        raise InvalidConfigError(f"--threads must be >= 1, got {threads}")
    with cpu_threads(compute_device, threads):
        resolved = _resolve_in_order(refs, token, state)
        pivot_ingredient = None
        if isinstance(config.pivot, str) and config.pivot not in ("mean", "first"):
            pivot_ingredient = _resolve_in_order([config.pivot], token, state)[0]
        checkpoints = open_checkpoints(resolved)
        pivot_ckpt = Checkpoint(pivot_ingredient.path, name=pivot_ingredient.ref) if pivot_ingredient else None
        report = check_compatibility(checkpoints + ([pivot_ckpt] if pivot_ckpt else []),
                                     allow_dtype_mismatch=config.dtype != "auto")
        if not report.ok:
            raise IncompatibleCheckpointsError(report.summary(), report=report)
        for note in report.notes:
            logger.info("note: %s", note)

        pivot: Any = 0 if config.pivot == "first" else config.pivot
        pivot_source: Any = pivot_ckpt if pivot_ckpt is not None else pivot
        order = ingredient_order(len(refs), config.epochs, shuffle=config.shuffle, seed=config.seed)
        names = checkpoints[0].names()
        out_tensors = [(n, checkpoints[0].info(n).shape, _output_dtype(config, checkpoints[0].info(n).dtype)) for n in names]
        pivot_record = pivot_ingredient if pivot_ingredient else pivot
        metadata = {
            "ame_hf": _version(),
            "ame_optimizer": config.optimizer,
            "ame_ingredients": str(len(refs)),
            "ame_config_sha256": config_digest(config, resolved, pivot_record),
        }
        plan = plan_shards(out_tensors, parse_size(config.max_shard_size), metadata)

        staging = make_staging_dir(out) if rank == 0 else None
        if state is not None and world > 1:
            from accelerate.utils import broadcast_object_list

            staging = Path(broadcast_object_list([str(staging) if staging else None])[0])
        assert staging is not None
        try:
            if rank == 0:
                create_shard_files(staging, plan)
            _barrier(state, world)
            sizes = {n: checkpoints[0].info(n).nbytes for n in names}
            mine = assign_to_processes(sizes, world)[rank]
            logger.log(logging.INFO if world > 1 else logging.DEBUG, "process %d of %d on %s: %d tensor(s), %.1f MB",
                       rank + 1, world, compute_device, len(mine), sum(sizes[n] for n in mine) / 1e6)
            io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ame-hf-io")
            try:
                merger = _TensorMerger(checkpoints, pivot_source, config, order, compute_device, io)
                _run_tensors(merger, mine, sizes, staging, plan, progress and rank == 0, callback)
                merger.flush()
            finally:
                io.shutdown(wait=True, cancel_futures=True)
            _barrier(state, world)
            result = MergeResult(path=out, config=config, ingredients=resolved, order=order, pivot=pivot_record,
                                 seconds=0.0, report=report, device=str(compute_device))
            if rank == 0:
                write_index(staging, plan)
                _finish(staging, result, checkpoints, pivot_ckpt, command)
                publish(staging, out, overwrite)
            _barrier(state, world)
        except OSError as err:
            if rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, OutputError):
                raise
            raise OutputError(describe_os_error(err, out)) from None
        except BaseException:
            # Errors and Ctrl-C alike: never leave a half-written model behind.
            if rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        return dataclasses.replace(result, seconds=time.perf_counter() - started)


@contextmanager
def cpu_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """torch intra-op threads for a CPU merge (default 1), restored afterwards."""
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _validate_counts(refs: Sequence[str], config: AmeConfig) -> None:
    if len(refs) < 2:
        raise InvalidConfigError(f"AME needs at least 2 ingredients, got {len(refs)}; list every checkpoint to merge")
    seen: dict[str, int] = {}
    for i, ref in enumerate(refs):
        if ref in seen:
            logger.warning("ingredient %r is given twice (positions %d and %d): it counts twice in the average",
                           ref, seen[ref] + 1, i + 1)
        seen.setdefault(ref, i)
    if isinstance(config.pivot, int) and config.pivot >= len(refs):
        raise InvalidConfigError(
            f"pivot index {config.pivot} is out of range for {len(refs)} ingredients (use 0..{len(refs) - 1})"
        )
    if config.batch_size > len(refs):
        raise InvalidConfigError(
            f"batch_size {config.batch_size} is larger than the number of ingredients ({len(refs)})"
        )


def _resolve_in_order(refs: Sequence[str], token: str | None, state: Any) -> list[Ingredient]:
    if state is None or state.num_processes == 1:
        return resolve_all(refs, token)
    # The main process downloads first; the others then find everything in the cache.
    if state.is_main_process:
        resolved = resolve_all(refs, token)
        _barrier(state, state.num_processes)
        return resolved
    _barrier(state, state.num_processes)
    return resolve_all(refs, token)


def _barrier(state: Any, world: int) -> None:
    if state is None or world <= 1:
        return
    if state.device.type == "cpu":
        # accelerate's wait_for_everyone passes device_ids=[local rank], which torch turns into a
        # CUDA device whenever the machine has one: CPU processes beyond the GPU count then fail
        # with "invalid device ordinal". A plain barrier on the gloo group needs no device.
        torch.distributed.barrier()
    else:
        state.wait_for_everyone()


def _run_tensors(merger: _TensorMerger, names: list[str], sizes: dict[str, int], staging: Path,
                 plan: ShardPlan, show: bool, callback: ProgressCallback | None) -> None:
    from tqdm.auto import tqdm

    total = sum(sizes[n] for n in names)
    done = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="AME", disable=not show) as bar:
        def advance(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            bar.update(nbytes)
            if callback is not None:
                callback(done, total)

        for name in names:
            bar.set_postfix_str(name[-40:], refresh=False)
            merger.run(name, staging, plan, advance)


def _version() -> str:
    from . import __version__

    return __version__


def _finish(staging: Path, result: MergeResult, checkpoints: list[Checkpoint], pivot_ckpt: Checkpoint | None,
            command: str | None) -> None:
    """Config, tokenizer and generation files from the pivot (or first ingredient), ame_config.yaml, card."""
    from .card import render_card, write_run_file

    source = pivot_ckpt or checkpoints[result.pivot if isinstance(result.pivot, int) else 0]
    config = dict(source.config)
    if config.pop("auto_map", None) is not None:
        logger.warning("%s: config.json has auto_map (remote code); it is not copied and never run", source.name)
    config.pop("_name_or_path", None)
    if result.config.dtype != "auto":
        config["dtype"] = result.config.dtype
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for file in sorted(source.path.iterdir()):
        if file.name == "config.json" or not file.is_file() or file.suffix in (".py", ".bin", ".safetensors"):
            continue
        if any(fnmatch.fnmatch(file.name, p) for p in SIDE_PATTERNS):
            shutil.copyfile(file, staging / file.name)
    write_run_file(staging / "ame_config.yaml", result)
    render_card(result, checkpoints, command=command).save(staging / "README.md")
