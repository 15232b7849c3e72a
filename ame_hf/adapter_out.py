"""Adapters out (`save_as="adapter"`): a merge written as a PEFT LoRA adapter of its base. Each changed linear
weight's delta (merged minus base) is factored by a truncated SVD; other changed modules go to `modules_to_save`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from . import __version__
from ._lora_factors import AdapterSummary, factor_delta
from ._meta_model import UnknownArchitecture, on_meta
from .checkpoint import Checkpoint
from .config import AmeConfig
from .devices import cpu_threads
from .errors import CheckpointError, InvalidConfigError
from .output import RUN_FILE, check_output_dir, make_staging_dir, publish, staging_cleanup
from .plan import plan_shards
from .records import Ingredient, MergeResult
from .resolve import local_inputs
from .writer import create_shard_files, write_rows

if TYPE_CHECKING:
    from .checked_inputs import Entry, Inputs
    from .inputs import InputStage

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# How peft names what it saves: `base_model.model.<module>.lora_A.weight`, a saved module's own tensor names.
PEFT_PREFIX = "base_model.model."
# Rows of a weight read at once into its float64 delta (a fixed number: the same bytes whatever the merge's blocks).
DELTA_ROWS = 1024
# The AmeConfig fields that say how an output is saved, and their values for a full model.
AS_MODEL = {"save_as": "model", "adapter_rank": None, "adapter_energy": None}
NO_BASE = ("save_as='adapter' needs the base model the adapter applies to: pass base=REF (the model the ingredients "
           "were fine-tuned from), or merge PEFT adapters, whose base counts")
# Architecture suffix -> peft task type (its PeftModel subclass; `generate` for a causal LM).
_TASK_TYPES = [("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
               ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
               ("ForQuestionAnswering", "QUESTION_ANS")]


def full_model_config(config: AmeConfig) -> AmeConfig:
    """`config` writing a full model: what the merge behind an adapter (and each of tune's candidates) runs."""
    return dataclasses.replace(config, **AS_MODEL)


def adapter_base(inputs: "Inputs") -> "Entry":
    """The base model an adapter output applies to: `base`, else the adapters' own, else a checkpoint pivot.

    Raises:
        InvalidConfigError: there is none (`NO_BASE`), before any weight is read.
    """
    base = inputs.base or inputs.pivot
    if base is None:
        raise InvalidConfigError(NO_BASE, fields=("save_as", "base"))
    return base


def checked_base(stage: "InputStage", refs: Sequence[str], config: AmeConfig) -> "Entry":
    """`adapter_base` of the inputs as a merge with `config` checks them (the check is the stage's, made once)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InvalidConfigError("save_as='adapter' runs in one process; run it without torchrun", field="save_as")
    inputs = stage.check(refs, pivot=config.pivot, base=config.base, tokenizer_source=config.tokenizer_source,
                         allow_dtype_mismatch=config.dtype != "auto")
    inputs.raise_for_errors()
    return adapter_base(inputs)


def merge_as_adapter(refs: list[str], out: Path, config: AmeConfig, started: float, *,
                     run: Callable[..., MergeResult], stage: "InputStage | None", token: str | None,
                     overwrite: bool, recorded_at: Path | None, **options: Any) -> MergeResult:
    """`merge` with `save_as="adapter"`: the full merge into a scratch folder beside `out`, then the adapter.

    Args:
        refs, out, config, started, token, overwrite, recorded_at: as `merging._merge`.
        run: `merging._merge` (the full merge).
        stage: the input stage to share (default: a new one).
        options: the other keywords of `_merge` (progress, device, ...).

    Returns:
        The `MergeResult` of the adapter output.

    Raises:
        InvalidConfigError: no base (before the merge), and whatever the merge raises.
    """
    from .inputs import InputStage

    check_output_dir(out, overwrite, inputs=local_inputs([*refs, *config.other_refs]))
    stage = stage or InputStage(token=token, variant=config.variant)
    base = checked_base(stage, refs, config)
    scratch = make_staging_dir(out)
    try:
        full = run(refs, scratch / out.name, full_model_config(config), started, token=token, stage=stage,
                   recorded_at=recorded_at or out.absolute(), **options)
        result = dataclasses.replace(full, path=out, config=config, recorded_at=recorded_at)
        save_adapter(full.path, out, base_of(stage, base), config, overwrite=overwrite, result=result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dataclasses.replace(result, seconds=time.perf_counter() - started)


def base_of(stage: "InputStage", entry: "Entry") -> Ingredient:
    """The base's `Ingredient`, its weights fetched."""
    stage.fetch([entry])
    return entry.light


def save_adapter(full_dir: Path, out: Path, base: Ingredient, config: AmeConfig, *, overwrite: bool,
                 result: MergeResult | None = None) -> AdapterSummary:
    """Write the adapter of the full model in `full_dir` over `base` to `out` (staged, then moved into place).

    Beside the adapter: `full_dir`'s tokenizer and side files (not its config.json or weights), `ame_config.yaml`
    (`result`'s, else `full_dir`'s with the adapter options) and its card with the adapter's sections.

    Args:
        full_dir: a merge output (or tune's pick).
        out: the output folder.
        base: the base model, its weights local.
        config: gives `adapter_rank`, `adapter_energy` and `variant`.
        overwrite: replace a previous ame-hf output at `out`.
        result: the merge's record, for `ame_config.yaml`.

    Returns:
        The `AdapterSummary`.
    """
    from .finish import copy_model_files
    from .recipe import write_run_file

    staging = make_staging_dir(out)
    with staging_cleanup(staging, out):
        summary = write_adapter(full_dir, base, staging, config)
        copy_model_files(full_dir, staging, skip=lambda name: name in ("config.json", "README.md", RUN_FILE))
        if result is not None:
            write_run_file(staging / RUN_FILE, result)
        elif (full_dir / RUN_FILE).is_file():
            _adapter_run_file(full_dir / RUN_FILE, staging / RUN_FILE, config)
        from .adapter_card import write_adapter_card

        write_adapter_card(full_dir / "README.md", staging, summary, name=out.absolute().name,
                           model_config=json.loads((full_dir / "config.json").read_text(encoding="utf-8")),
                           result=result)
        publish(staging, out, overwrite)
    return summary


def _adapter_run_file(source: Path, target: Path, config: AmeConfig) -> None:
    """A full output's `ame_config.yaml` with the adapter options (its comment lines kept)."""
    import yaml

    text = source.read_text(encoding="utf-8")
    comments = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    values = yaml.safe_load(text)
    values.update({k: getattr(config, k) for k in AS_MODEL})
    target.write_text(comments + yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


def write_adapter(full_dir: Path, base: Ingredient, staging: Path, config: AmeConfig) -> AdapterSummary:
    """`adapter_config.json` and `adapter_model.safetensors` of the full model in `full_dir` over `base`.

    One tensor at a time (and its factors): a changed 2-D weight of an `nn.Linear` whose other tensors are the
    base's is factored (`_lora_factors`), unless its factors would be larger than itself; that weight, any other
    changed tensor, one of another shape (new vocabulary rows) or one the base lacks puts its module into
    `modules_to_save`, written as peft saves it.

    Raises:
        CheckpointError: a changed tensor that is no tensor of the model transformers builds, or nothing changed.
    """
    merged = Checkpoint(full_dir)
    base_ckpt = Checkpoint(base.path, base.display_name, variant=config.variant)
    model = _meta_model(merged)
    modules = dict(model.named_modules())
    changed: list[str] = []
    with cpu_threads(torch.device("cpu"), None):  # one thread: the same bytes on any machine
        for name in sorted(merged.names()):
            if not _same_as_base(merged, base_ckpt, name):
                changed.append(name)
        lora, saved = _split(changed, merged, base_ckpt, modules)
        if not lora and not saved:
            raise CheckpointError(f"the merge equals its base {base.display_name}: there is no adapter to save; "
                                  "save it as a model", path=full_dir)
        summary = AdapterSummary(saved=list(saved), base=base)
        spare: tuple[str, Any] | None = None
        for module in lora:
            name = f"{module}.weight"
            delta, floor = _delta(merged, base_ckpt, name)
            factors = factor_delta(delta, merged.info(name).dtype, cap=config.adapter_rank,
                                   energy=config.adapter_energy, floor=floor)
            numel = delta.numel()
            del delta
            if factors.A.numel() + factors.B.numel() < numel:
                summary.factors[module] = factors
            else:  # the factors would be larger than the weight: saved whole, exactly
                summary.saved.append(module)
                spare = spare or (module, factors)
            del factors
        if not summary.factors and spare:  # peft loads no adapter without a LoRA module: keep one factored
            summary.saved.remove(spare[0])
            summary.factors[spare[0]] = spare[1]
        if not summary.factors:
            raise CheckpointError(f"no linear weight of the merge differs from its base {base.display_name} (only "
                                  f"{', '.join(summary.saved)}), and peft loads no LoRA adapter without one; save "
                                  "it as a model", path=full_dir)
        summary.tied = _tied_copies(model, summary.saved, merged)
        summary.saved = sorted({*summary.saved, *(n.rpartition(".")[0] for n in summary.tied)})
    _write_tensors(staging, summary, merged)
    summary.nbytes = (staging / ADAPTER_WEIGHTS).stat().st_size
    _write_config(staging, summary, merged.config, base)
    for module, f in summary.factors.items():
        logger.debug("%s: rank %d, relative error %.3g (%s)", module, f.rank, f.error, f.method)
    logger.info("adapter: %d module(s) factored (largest relative error %.3g), %d saved whole; %d bytes",
                len(summary.factors), max((f.error for f in summary.factors.values()), default=0.0),
                len(summary.saved), summary.nbytes)
    return summary


def _delta(merged: Checkpoint, base: Checkpoint, name: str) -> tuple[torch.Tensor, float]:
    """Merged minus base in float64, filled `DELTA_ROWS` rows at a time (memory: the delta and one block of each),
    and the float rounding of the merged weights (`eps * ||merged||_F`, see `factor_delta`). Each element is
    computed alone: the blocks change no value."""
    shape = tuple(merged.info(name).shape)
    delta = torch.empty(shape, dtype=torch.float64)
    squares = 0.0
    for start in range(0, shape[0], DELTA_ROWS):
        rows = (start, min(start + DELTA_ROWS, shape[0]))
        block = merged.read(name, rows=rows)
        squares += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
        delta[rows[0]:rows[1]] = block
        delta[rows[0]:rows[1]] -= base.read(name, rows=rows, dtype=torch.float64)
    return delta, torch.finfo(merged.info(name).dtype).eps * squares ** 0.5


def _meta_model(merged: Checkpoint) -> torch.nn.Module:
    try:
        return on_meta(merged.config)[2]
    except UnknownArchitecture as err:
        raise CheckpointError(f"save_as='adapter' needs a transformers architecture: {err}", path=merged.path) from err


def _tied_copies(model: torch.nn.Module, saved: list[str], merged: Checkpoint) -> dict[str, str]:
    """Tensors tied to a saved one that the checkpoint does not store (a tied head): {name: the stored name}. peft
    keeps them tied (`ensure_weight_tying`) only when the tied module is saved with the same weights."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    stored = set(merged.names())
    copies = {}
    for names in groups.values():
        source = next((n for n in names if n in stored and any(n.startswith(f"{m}.") for m in saved)), None)
        copies.update({n: source for n in names if source is not None and n not in stored})
    return dict(sorted(copies.items()))


def _same_as_base(merged: Checkpoint, base: Checkpoint, name: str) -> bool:
    if name not in base.tensors or tuple(base.info(name).shape) != tuple(merged.info(name).shape):
        return False
    ours, theirs = merged.read(name), base.read(name)
    return torch.equal(ours, theirs.to(ours.dtype)) if ours.is_floating_point() else torch.equal(ours, theirs)


def _split(changed: list[str], merged: Checkpoint, base: Checkpoint,
           modules: dict[str, torch.nn.Module]) -> tuple[list[str], list[str]]:
    """(modules factored, modules saved whole), each sorted; a module under a saved one is saved with it."""
    by_module: dict[str, list[str]] = {}
    for name in changed:
        module, _, leaf = name.rpartition(".")
        if module not in modules or not hasattr(modules[module], leaf):
            raise CheckpointError(f"{name} is no tensor of the {type(modules['']).__name__} transformers builds "
                                  "from the config; save this merge as a model", path=merged.path)
        by_module.setdefault(module, []).append(leaf)
    lora, saved = [], []
    for module, leaves in sorted(by_module.items()):
        name = f"{module}.weight"
        factorable = (isinstance(modules[module], torch.nn.Linear) and leaves == ["weight"] and name in base.tensors
                      and tuple(base.info(name).shape) == tuple(merged.info(name).shape))
        (lora if factorable else saved).append(module)
    saved = [m for m in saved if not any(m.startswith(f"{s}.") for s in saved)]
    lora = [m for m in lora if not any(m.startswith(f"{s}.") for s in saved)]
    return lora, saved


def _saved_tensors(summary: AdapterSummary, merged: Checkpoint) -> list[str]:
    return [n for n in sorted(merged.names()) if any(n.startswith(f"{m}.") for m in summary.saved)]


def _write_tensors(staging: Path, summary: AdapterSummary, merged: Checkpoint) -> None:
    """`adapter_model.safetensors`, written in place tensor by tensor (a saved module is read when written)."""
    entries = []
    for module, f in sorted(summary.factors.items()):
        entries += [(f"{PEFT_PREFIX}{module}.lora_A.weight", tuple(f.A.shape), f.A.dtype),
                    (f"{PEFT_PREFIX}{module}.lora_B.weight", tuple(f.B.shape), f.B.dtype)]
    saved = _saved_tensors(summary, merged)
    entries += [(PEFT_PREFIX + n, tuple(merged.info(n).shape), merged.info(n).dtype) for n in saved]
    entries += [(PEFT_PREFIX + n, tuple(merged.info(s).shape), merged.info(s).dtype) for n, s in summary.tied.items()]
    plan = plan_shards(entries, 1 << 62, {"format": "pt", "ame_hf": __version__})
    create_shard_files(staging, plan)
    for module, f in sorted(summary.factors.items()):
        write_rows(staging, plan, f"{PEFT_PREFIX}{module}.lora_A.weight", 0, f.A)
        write_rows(staging, plan, f"{PEFT_PREFIX}{module}.lora_B.weight", 0, f.B)
    for n in saved:
        write_rows(staging, plan, PEFT_PREFIX + n, 0, merged.read(n))
    for n, source in summary.tied.items():
        write_rows(staging, plan, PEFT_PREFIX + n, 0, merged.read(source))
    os.replace(staging / plan.shards[0].name, staging / ADAPTER_WEIGHTS)


def _write_config(staging: Path, summary: AdapterSummary, model_config: dict[str, Any], base: Ingredient) -> None:
    """`adapter_config.json`: peft's `LoraConfig` with scaling 1 everywhere (`lora_alpha` = each module's rank)."""
    from peft import LoraConfig

    ranks = {m: f.rank for m, f in summary.factors.items()}
    top = max(ranks.values(), default=1)
    pattern = {re.escape(m): r for m, r in sorted(ranks.items()) if r != top}
    arch = " ".join(model_config.get("architectures") or [])
    config = LoraConfig(
        r=top, lora_alpha=top, target_modules=sorted(ranks), modules_to_save=summary.saved or None,
        rank_pattern=pattern, alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none",
        ensure_weight_tying=bool(summary.tied),
        task_type=next((t for suffix, t in _TASK_TYPES if arch.endswith(suffix)), None),
        base_model_name_or_path=base.repo_id or os.path.realpath(base.path), revision=base.sha or base.revision)
    values = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()}
    (staging / ADAPTER_CONFIG).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
