"""`merge`: resolve -> check -> plan -> stream (engine + writer) -> finish -> publish, the one function
behind the CLI, the Python API and the Space (DESIGN §3). Each stage is a module; this one only calls them."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from ._options import config_with, merge_options
from .config import QUANTIZED_OUTPUT_DTYPES, AmeConfig, parse_size
from . import journal
from .devices import barrier, cpu_threads, main_process_first, process_setup, share_object, share_path
from .engine import decay_arguments, ingredient_order
from .finish import finish
from .inputs import InputStage
from .modules import merge_module_folders
from .output import check_output_dir, make_staging_dir, publish, staging_cleanup
from .plan import assign_to_processes, output_dtype, plan_shards
from .recipe import recipe_digest
from .records import MergeResult
from .requantize import quantized_output_check, requantize
from .resolve import local_inputs
from .streaming import DEFAULT_MAX_MEMORY, ProgressCallback, TensorMerger, stream_tensors
from .writer import write_index

logger = logging.getLogger(__name__)


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
    max_memory: str | int | None = None,
    stage: InputStage | None = None,
    recorded_at: str | os.PathLike | None = None,
    resume: bool = False,
    **options: Any,
) -> MergeResult:
    """Merge checkpoints with AME and write a `from_pretrained`-loadable model to `out_dir`.

    With `save_as="adapter"` (and `adapter_rank` / `adapter_energy`) the output is instead a PEFT LoRA adapter of
    the base (`base`, or the adapters' own) that `PeftModel.from_pretrained(base, out_dir)` loads (`adapter_out`).

    Args:
        ingredients: local directories and/or Hub repo IDs (`org/name`, `org/name@revision`).
        out_dir: the output directory; written in a staging directory and moved into place at the end.
        config: an `AmeConfig`; keyword `options` (e.g. `optimizer="adamw", lr=1e-4`) override it.
        token: Hub token for private or gated repos (default: `HF_TOKEN` or the login cache).
        overwrite: replace a previous ame-hf output at `out_dir` (never an input, the current or home
            directory, or a directory that is not an ame-hf output).
        progress: show a progress bar.
        callback: called as `callback(done_bytes, total_bytes)` as tensors finish.
        device: compute device (default: chosen by accelerate).
        threads: torch intra-op threads on the CPU during the merge (default 1: element-wise work on
            blocks gains little from threads and stalls badly when another process shares the cores;
            use several processes with `torchrun` to use more cores).
        max_memory: how much of one tensor's ingredient blocks may be kept in memory so that each input
            byte is read once (`128MiB` by default; a larger tensor keeps its first blocks that fit and reads the
            rest again).
        stage: an `inputs.InputStage` shared between runs (as `tune` shares one between its merges), so that
            each reference is resolved, fetched and parsed once; default: a new one (with `token`).
        recorded_at: where the output will live if you move it there after the merge (as `tune` moves its
            pick): `ame_config.yaml` and the card record local references relative to it (default: `out_dir`).
        resume: continue the unfinished merge of `out_dir` that the same call started (stopped by kill -9, a
            power loss, a full disk): the tensors it finished are verified and kept, the output is bit-identical
            to a run that never stopped; without one, start from the beginning. A failed run then keeps its
            finished part beside `out_dir` for the next `resume=True` (without `resume` it is removed).

    Returns:
        A `MergeResult` with the output path, resolved config, ingredients and order.

    Raises:
        InvalidConfigError, IngredientNotFoundError, CheckpointError, IncompatibleCheckpointsError,
        OutputError, HubError (all `AmeError`s); with `resume`, an unfinished merge of `out_dir` started with
        another config or other inputs: OutputError, one line.

    >>> result = merge(["./expert-a", "./expert-b"], "merged", optimizer="sgd")  # doctest: +SKIP
    >>> result.path                                                             # doctest: +SKIP
    PosixPath('merged')
    """
    started = time.perf_counter()
    config = config_with(config, options).resolved()
    refs = [os.fspath(r) for r in ingredients]
    merge_options(refs, config, threads=threads, max_memory=max_memory)
    _warn_repeated(refs)
    if config.save_as == "adapter":  # the full merge into a scratch folder, then its LoRA adapter
        from .adapter_out import merge_as_adapter

        return merge_as_adapter(refs, Path(out_dir), config, started, run=_merge, stage=stage, token=token,
                                overwrite=overwrite, progress=progress, callback=callback, device=device,
                                threads=threads, max_memory=max_memory,
                                recorded_at=Path(recorded_at) if recorded_at is not None else None)
    return _merge(refs, Path(out_dir), config, started, token=token, overwrite=overwrite, progress=progress,
                  callback=callback, device=device, threads=threads, max_memory=max_memory, stage=stage,
                  recorded_at=Path(recorded_at) if recorded_at is not None else None, resume=resume)


def materialize(ingredient: str | os.PathLike, out_dir: str | os.PathLike, *, base: str | os.PathLike | None = None,
                token: str | None = None, device: str | None = None, progress: bool = False,
                stage: InputStage | None = None) -> MergeResult:
    """One ingredient written as the full model it stands for, by the merge engine: the soup of one.

    For a PEFT adapter that is `W_base + delta` over its base (`base`, else the adapter's own
    `base_model_name_or_path`), the weights peft's `merge_and_unload()` gives, read block by block as in
    any merge. `evaluate` and `tune` score an adapter so (and `tune` writes it so when it selects it).

    Args:
        ingredient: a local directory or Hub repo ID: a PEFT adapter, or a full checkpoint (then copied as is).
        out_dir: the output directory.
        base: the adapter's base model (default: its `base_model_name_or_path`).
        token: Hub token for private or gated repos.
        device: compute device (default: chosen by accelerate).
        progress: show a progress bar.
        stage: an `inputs.InputStage` shared with the caller's other runs (default: a new one).

    Returns:
        The `MergeResult` of the soup of one.

    Raises:
        as `merge`; an adapter without a resolvable base: IncompatibleCheckpointsError, one line.

    >>> materialize("./lora", "full", base="org/base-model").path  # doctest: +SKIP
    PosixPath('full')
    """
    config = AmeConfig.soup(base=os.fspath(base) if base else None).resolved()
    return _merge([os.fspath(ingredient)], Path(out_dir), config, time.perf_counter(), token=token, device=device,
                  progress=progress, stage=stage)


def _merge(refs: list[str], out: Path, config: AmeConfig, started: float, *, token: str | None = None,
           overwrite: bool = False, progress: bool = True, callback: ProgressCallback | None = None,
           device: str | None = None, threads: int | None = None,
           max_memory: str | int | None = None, stage: InputStage | None = None,
           recorded_at: Path | None = None, resume: bool = False) -> MergeResult:
    """`merge` once its config is resolved and the ingredients counted."""
    extra = [*config.pivot_refs, *([config.base] if config.base else []), *config.tokenizer_refs]
    check_output_dir(out, overwrite, inputs=local_inputs([*refs, *extra]), resume=resume)
    setup = process_setup(device)
    with cpu_threads(setup.device, threads):
        with main_process_first(setup):  # the main process downloads; the others find it in the cache
            inputs = (stage or InputStage(token=token, variant=config.variant)).check(
                refs, pivot=config.pivot, base=config.base, tokenizer_source=config.tokenizer_source,
                allow_dtype_mismatch=config.dtype != "auto")
            inputs.raise_for_errors()
            quantized_output_check(config, inputs.report.checkpoints)  # before the download
            # Again with every input's real folder (a Hub ingredient's is in the cache), before the download.
            check_output_dir(out, overwrite, inputs=inputs.paths, resume=resume)
            pivot = inputs.pivot_ingredient
            key = journal.run_key(config, inputs.ingredients, pivot or (0 if config.pivot == "first" else config.pivot),
                                  [e.light for e in (inputs.pivot, inputs.base) if e is not None])
            # Before the download: a resume of another merge is refused at once.
            resumed = journal.take_up(out, key) if resume and setup.is_main else None
            inputs.open()
        report, checkpoints, pivot_ckpt = inputs.report, inputs.checkpoints, inputs.pivot_checkpoint
        readers = [c for r in [report, *(m.report for m in inputs.modules)]  # module folders' weights too
                   for c in [*r.checkpoints, *([r.pivot] if r.pivot is not None else [])]]
        # A stage shared between merges (tune) shares its opened checkpoints: count this merge's reads only.
        before = {id(c.reads): c.reads.bytes for c in readers}
        for note in report.notes:
            logger.info("note: %s", note)
        decay = decay_arguments(config.optimizer, dict(config.optimizer_args))
        if decay and setup.is_main:
            shown = ", ".join(f"{k} {v:g}" for k, v in decay.items())
            logger.warning("%s's %s shrinks every weight at every step, also where all ingredients agree; pass "
                           "optimizer_args with %s 0 to keep agreed weights exact", config.optimizer, shown,
                           " and ".join(decay))
        order = ingredient_order(len(refs), config.epochs, shuffle=config.shuffle, seed=config.seed,
                                 order=config.order)
        result = MergeResult(path=out, config=config, ingredients=inputs.ingredients, order=order, report=report,
                             base=inputs.base.light if inputs.base else None,
                             pivot=pivot or (0 if config.pivot == "first" else config.pivot), device=str(setup.device),
                             recorded_at=recorded_at)
        if resume and journal.finished(out, _stamp(result)):  # submitted again after it finished: nothing to do
            logger.info("%s already holds this merge, finished: nothing to do", out)
            return dataclasses.replace(result, seconds=time.perf_counter() - started, bytes_read=0)
        check_output_dir(out, overwrite)  # with resume, a previous output that is another merge: as without
        tensors = {n: checkpoints[0].info(n) for n in checkpoints[0].names()}
        shapes = {n: report.vocab.shape_of(n, i.shape) if report.vocab and n in report.vocab_keys else i.shape
                  for n, i in tensors.items()}
        plan = plan_shards([(n, shapes[n], output_dtype(config, i.dtype)) for n, i in tensors.items()],
                           parse_size(config.max_shard_size), _stamp(result))
        staging = share_path(setup, (resumed or make_staging_dir(out)) if setup.is_main else None)
        with staging_cleanup(staging, out, owner=setup.is_main, keep=resume):
            # The units of work: every tensor not yet written (all of them, unless resumed), split by bytes.
            done = share_object(setup, journal.prepare(staging, plan, key) if setup.is_main else None)
            barrier(setup)
            mine = assign_to_processes({n: i.nbytes for n, i in tensors.items() if n not in done},
                                       setup.world)[setup.rank]
            logger.log(logging.INFO if setup.world > 1 else logging.DEBUG, "process %d of %d on %s: %d tensor(s), %.1f MB",
                       setup.rank + 1, setup.world, setup.device, len(mine), sum(tensors[n].nbytes for n in mine) / 1e6)
            merger = TensorMerger(checkpoints, pivot_ckpt or result.pivot, config, order, setup.device,
                                  vocab=report.vocab, vocab_keys=report.vocab_keys,
                                  max_memory=DEFAULT_MAX_MEMORY if max_memory is None else parse_size(max_memory))
            warm = _warm_imports(setup.is_main)
            stream_tensors(merger, mine, staging, plan, show=progress and setup.is_main, callback=callback,
                           on_done=journal.Journal(staging, plan).record)
            _say_read_again(merger, setup)
            barrier(setup)
            if setup.is_main:
                merge_module_folders(inputs.modules, staging, config, order, setup.device, stamp=_stamp(result),
                                     pivot="mean" if pivot_ckpt is not None else result.pivot,
                                     max_memory=merger.max_memory)
                warm.join()
                write_index(staging, plan)
                if config.dtype in QUANTIZED_OUTPUT_DTYPES:
                    requantize(staging, report.checkpoints, config.dtype)
                source = report.config_source()
                tokens = inputs.tokenizer_dir()
                finish(staging, result, checkpoints, source=source,
                       tokenizer_dir=None if tokens == source.path else tokens, vocab=report.vocab)
                journal.close(staging)
                publish(staging, out, overwrite)
            barrier(setup)
    read = sum({id(c.reads): c.reads.bytes - before.get(id(c.reads), 0) for c in readers}.values())
    return dataclasses.replace(result, seconds=time.perf_counter() - started, bytes_read=read)


# What only the finish imports (the card: huggingface_hub's repocard and its HTTP stack, jinja2).
FINISH_IMPORTS = ("huggingface_hub.repocard", "jinja2")


def _say_read_again(merger: TensorMerger, setup: Any) -> None:
    """One line when tensors of this process's share were read more than once because their ingredient blocks
    exceed `--max-memory`, with the budget that would read each input byte once (more memory, less reading)."""
    if not merger.read_again:
        return
    need = sorted(merger.read_again.values())

    def mib(nbytes: int, exact: bool = False) -> str:  # as --max-memory takes it, rounded up (unless `exact`)
        unit, scale = ("MiB", 2**20) if nbytes >= 2**20 else ("KiB", 2**10) if nbytes >= 2**10 else ("B", 1)
        return f"{nbytes}B" if exact and nbytes % scale else f"{-(-nbytes // scale)}{unit}"

    who = f"process {setup.rank + 1} of {setup.world}: " if setup.world > 1 else ""
    smallest = sum(n <= need[0] for n in need)
    budgets = (f"{mib(need[0])} would read {smallest} of them once, {mib(need[-1])} all" if smallest < len(need)
               else f"{mib(need[-1])} would read them once")
    logger.info("%s%d tensor(s) were read more than once: their ingredient blocks exceed --max-memory (%s); "
                "--max-memory %s (holding up to that much for one tensor)",
                who, len(need), mib(merger.max_memory, exact=True), budgets)


def _warm_imports(is_main: bool) -> threading.Thread:
    """Import what the finish needs in a thread while the tensors stream: the streaming waits on reads and
    on torch, which leave the interpreter free. Joined before the finish; a failure there is only raised
    by the finish's own import."""
    def run() -> None:
        for name in FINISH_IMPORTS if is_main else ():
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 (the finish imports it again, and says what is wrong)
                return

    thread = threading.Thread(target=run, name="ame-hf-imports", daemon=True)
    thread.start()
    return thread


def _stamp(result: MergeResult) -> dict[str, str]:
    """The short provenance stamp in every shard's safetensors header."""
    return {"ame_hf": __version__, "ame_optimizer": result.config.optimizer,
            "ame_ingredients": str(len(result.ingredients)),
            "ame_config_sha256": recipe_digest(result.config, result.ingredients, result.pivot)}


def _warn_repeated(refs: Sequence[str]) -> None:
    seen: dict[str, int] = {}
    for i, ref in enumerate(refs):
        if ref in seen:
            logger.warning("ingredient %r is given twice (positions %d and %d): it counts twice in the average",
                           ref, seen[ref] + 1, i + 1)
        seen.setdefault(ref, i)
