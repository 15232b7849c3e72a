"""The inputs of a merge, checked before their weights are downloaded: every reference planned, the
light files and safetensors headers of Hub repos fetched, the compatibility report made from those;
then, once it passed, the weights fetched (their size announced, the disk checked) and opened."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .adapters import ADAPTER_FILES, AdapterCheckpoint, adapter_base, is_adapter_dir, read_adapter_config
from .checkpoint import Checkpoint
from .compatibility import CompatibilityReport, check_compatibility, config_refusals
from .errors import CheckpointError, IncompatibleCheckpointsError
from .fetch import (check_disk_space, download_size, fetch_light, fetch_weights, format_size, header_checkpoint,
                    hub_cache)
from .records import HubSource, Ingredient
from .resolve import plan_refs
from .config import SOURCE_WORDS
from .vocabulary import is_tokenizer_file, read_tokenizer

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class _Entry:
    """One input as the check sees it: where it comes from, its light files, its role."""

    source: Ingredient | HubSource
    light: Ingredient
    adapter: dict[str, Any] | None = None  # adapter_config.json of a PEFT adapter


@dataclass(kw_only=True)
class CheckedInputs:
    """What `check_inputs` saw: the ingredients, the pivot and the adapters' base (if any), and the report."""

    entries: list[_Entry]
    pivot: _Entry | None
    base: _Entry | None
    pivot_is_base: bool
    report: CompatibilityReport
    downloaded_to_check: list[str]

    @property
    def paths(self) -> list[Path]:
        """Every input's local directory (a Hub one's is in the cache): what `--out` may never touch."""
        return [e.light.path for e in [*self.entries, *([self.pivot] if self.pivot else []),
                                       *([self.base] if self.base else [])]]


@dataclass(kw_only=True)
class Inputs:
    """The opened inputs of a merge, under the output's tensor names (from the compatibility report)."""

    ingredients: list[Ingredient]
    pivot: Ingredient | None
    base: Ingredient | None
    checkpoints: list[Checkpoint]
    pivot_checkpoint: Checkpoint | None
    report: CompatibilityReport


def check_inputs(refs: Sequence[str], *, pivot_ref: str | None = None, base_ref: str | None = None,
                 pivot_is_base: bool = False, variant: str | None = None, token: str | None = None,
                 allow_dtype_mismatch: bool = False, tokenizer_source: str | int = "auto") -> CheckedInputs:
    """The compatibility report of `refs` (and a pivot checkpoint), reading for Hub repos only their
    config, tokenizer and side files and their safetensors headers. `.bin`-only repos have no header:
    their weights are downloaded to check them (and listed in `downloaded_to_check`). A PEFT adapter
    counts as the full model it makes of its base (`base_ref`, else its `base_model_name_or_path`)."""
    entries = [_entry(s, token) for s in plan_refs([*refs, *([pivot_ref] if pivot_ref else [])], token=token)]
    pivot = entries.pop() if pivot_ref else None
    base, errors = _base(entries, base_ref, pivot_is_base, token)
    models = [e for e in [*entries, *([pivot] if pivot else []), *([base] if base else [])] if e.adapter is None]
    errors += [line for e in models for line in config_refusals(e.source.ref, Checkpoint.read_config(e.light.path,
                                                                                                     e.source.ref))]
    names = [e.source.ref for e in entries]
    if errors:  # config.json alone says no: not even the headers are read
        return CheckedInputs(entries=entries, pivot=pivot, base=base, pivot_is_base=pivot_is_base,
                             downloaded_to_check=[], report=CompatibilityReport(names=names, errors=errors))
    fetched: list[str] = []
    base_ckpt = _header_or_open(base, variant, token, fetched) if base else None
    ckpts = [_header_or_open(e, variant, token, fetched, base_ckpt) for e in entries]
    pivot_ckpt = _header_or_open(pivot, variant, token, fetched) if pivot else (base_ckpt if pivot_is_base else None)
    report = check_compatibility(ckpts, pivot=pivot_ckpt, allow_dtype_mismatch=allow_dtype_mismatch,
                                 tokenizer_source=_tokenizer_setting(tokenizer_source, token))
    report.notes[:0] = [c.describe() for c in ckpts if isinstance(c, AdapterCheckpoint)]
    report.notes += [f"{ref} has .bin weights (no header to read): downloaded to check it" for ref in fetched]
    return CheckedInputs(entries=entries, pivot=pivot, base=base, pivot_is_base=pivot_is_base, report=report,
                         downloaded_to_check=fetched)


def open_inputs(checked: CheckedInputs, *, variant: str | None = None, token: str | None = None,
                allow_dtype_mismatch: bool = False, tokenizer_source: str | int = "auto") -> Inputs:
    """After the check passed: download what is missing (announced, disk checked first) and open it all."""
    if not checked.report.ok:
        raise IncompatibleCheckpointsError(checked.report.summary(), report=checked.report)
    every = [*checked.entries, *([checked.pivot] if checked.pivot else []), *([checked.base] if checked.base else [])]
    remote = [e for e in every if isinstance(e.source, HubSource) and e.adapter is None]
    needed = download_size([e.source for e in remote], [e.light for e in remote], variant)
    if needed:
        logger.info("downloading %s of weights from %d repo(s)", format_size(needed), len(remote))
        check_disk_space(needed, hub_cache())
    for e in remote:
        e.light = fetch_weights(e.source, e.light, variant=variant, token=token)
    base_ckpt = Checkpoint(checked.base.light.path, name=checked.base.source.ref, variant=variant) if checked.base else None
    ckpts = [_open(e, variant, base_ckpt) for e in checked.entries]
    pivot_ckpt = (_open(checked.pivot, variant, None) if checked.pivot else
                  base_ckpt if checked.pivot_is_base else None)
    report = check_compatibility(ckpts, pivot=pivot_ckpt, allow_dtype_mismatch=allow_dtype_mismatch,
                                 tokenizer_source=_tokenizer_setting(tokenizer_source, token))
    if not report.ok:  # the weights say otherwise than their headers did: refuse all the same
        raise IncompatibleCheckpointsError(report.summary(), report=report)
    pivot = checked.pivot or (checked.base if checked.pivot_is_base else None)
    return Inputs(ingredients=[e.light for e in checked.entries], pivot=pivot.light if pivot else None,
                  base=checked.base.light if checked.base else None, checkpoints=report.checkpoints,
                  pivot_checkpoint=report.pivot, report=report)


def _tokenizer_setting(source: str | int, token: str | None) -> str | int | Any:
    """`--tokenizer-source` for the check: a keyword or index as is, another checkpoint as its tokenizer."""
    if isinstance(source, int) or source in SOURCE_WORDS:
        return source
    planned = plan_refs([source], token=token)[0]
    return read_tokenizer((planned if isinstance(planned, Ingredient) else fetch_light(planned, token=token)).path)


def _entry(source: Ingredient | HubSource, token: str | None) -> _Entry:
    light = source if isinstance(source, Ingredient) else fetch_light(source, token=token)
    adapter = read_adapter_config(light.path, source.ref) if is_adapter_dir(light.path) else None
    return _Entry(source=source, light=light, adapter=adapter)


def _base(entries: list[_Entry], base_ref: str | None, pivot_is_base: bool,
          token: str | None) -> tuple[_Entry | None, list[str]]:
    """The one base model every adapter is a fine-tune of (`--base`, else the adapters' own), or errors."""
    adapters = [e for e in entries if e.adapter is not None]
    wanted = {e.source.ref: base_ref or adapter_base(e.adapter) for e in adapters}
    if not adapters and not base_ref:
        return None, (["--pivot base needs PEFT adapters among the ingredients, or --base REF"] if pivot_is_base else [])
    missing = [ref for ref, b in wanted.items() if not b]
    if missing:
        return None, [f"{', '.join(missing)}: adapter_config.json names no base model; pass --base REF"]
    refs = list(dict.fromkeys(wanted.values() or [base_ref]))
    bases = [_entry(s, token) for s in plan_refs(refs, token=token)]
    identities = {b.source.ref: b.light.identity for b in bases}
    if len(set(identities.values())) > 1:
        named = "; ".join(f"{a} -> {wanted[a]}" for a in wanted)
        return None, [f"the adapters name different base models ({named}); they must share one: pass --base REF"]
    return bases[0], []


def _header_or_open(entry: _Entry, variant: str | None, token: str | None, fetched: list[str],
                    base: Checkpoint | None = None) -> Checkpoint:
    """For the check: a Hub model from its headers (a `.bin` one downloaded), a local one opened, an
    adapter (small: downloaded) over its base."""
    source = entry.source
    if entry.adapter is not None:
        if isinstance(source, HubSource):
            entry.light = fetch_weights(source, entry.light, files=list(ADAPTER_FILES), token=token)
        assert base is not None
        return AdapterCheckpoint(entry.light.path, base, source.ref)
    if isinstance(source, HubSource) and source.sha is not None:
        try:
            ckpt = header_checkpoint(source, entry.light, variant=variant, token=token)
        except CheckpointError as err:
            raise CheckpointError(f"{source.ref}: {err}", path=getattr(err, "path", None)) from err
        if ckpt is not None:
            return ckpt
        fetched.append(source.ref)
        entry.light = fetch_weights(source, entry.light, variant=variant, token=token)
    return Checkpoint(entry.light.path, name=source.ref, variant=variant)


def _open(entry: _Entry, variant: str | None, base: Checkpoint | None) -> Checkpoint:
    if entry.adapter is not None:
        assert base is not None
        return AdapterCheckpoint(entry.light.path, base, entry.source.ref)
    return Checkpoint(entry.light.path, name=entry.source.ref, variant=variant)


def config_source(inputs: Inputs, pivot: str | int) -> Checkpoint:
    """The checkpoint whose config (and side files) the output takes: the pivot when it is a model of the
    ingredients' architecture, else the ingredient whose layout the check chose (the first, usually)."""
    chosen = inputs.checkpoints[inputs.report.source]
    arch = chosen.config.get("architectures")
    if inputs.pivot_checkpoint is not None and inputs.pivot_checkpoint.config.get("architectures") == arch:
        return inputs.pivot_checkpoint
    if isinstance(pivot, int) and inputs.checkpoints[pivot].config.get("architectures") == arch:
        return inputs.checkpoints[pivot]
    return chosen


def tokenizer_dir(inputs: Inputs, pivot: str | int, source: str | int, *, token: str | None = None) -> Path:
    """Where the output's tokenizer, chat template and processor files come from (`--tokenizer-source`).
    An adapter's own folder counts when it holds a tokenizer; else its base's."""
    if source in ("auto", "union", "pivot"):
        if inputs.pivot is not None:
            return inputs.pivot.path
        source = pivot if isinstance(pivot, int) else 0
    if source == "first":
        source = 0
    if isinstance(source, int):
        ingredient, ckpt = inputs.ingredients[source], inputs.checkpoints[source]
        if isinstance(ckpt, AdapterCheckpoint) and not any(is_tokenizer_file(p.name) for p in ingredient.path.iterdir()):
            return ckpt.path  # the base's directory
        return ingredient.path
    planned = plan_refs([source], token=token)[0]
    return (planned if isinstance(planned, Ingredient) else fetch_light(planned, token=token)).path
