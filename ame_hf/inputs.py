"""The inputs of a merge, checked before their weights are downloaded: every reference planned, the
light files and safetensors headers of Hub repos fetched, the compatibility report made from those;
then, once it passed, the weights fetched (their size announced, the disk checked) and opened."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .checkpoint import Checkpoint
from .compatibility import CompatibilityReport, check_compatibility, config_refusals
from .errors import CheckpointError, IncompatibleCheckpointsError
from .fetch import (check_disk_space, download_size, fetch_light, fetch_weights, format_size, header_checkpoint,
                    hub_cache)
from .records import HubSource, Ingredient
from .resolve import plan_refs

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class CheckedInputs:
    """What `check_inputs` saw: the planned references, their light files, and the report."""

    sources: list[Ingredient | HubSource]
    lights: list[Ingredient]
    report: CompatibilityReport
    n_ingredients: int
    downloaded_to_check: list[str]


@dataclass(kw_only=True)
class Inputs:
    """The opened inputs of a merge, under the output's tensor names (from the compatibility report)."""

    ingredients: list[Ingredient]
    pivot: Ingredient | None
    checkpoints: list[Checkpoint]
    pivot_checkpoint: Checkpoint | None
    report: CompatibilityReport


def check_inputs(refs: Sequence[str], *, pivot_ref: str | None = None, variant: str | None = None,
                 token: str | None = None, allow_dtype_mismatch: bool = False) -> CheckedInputs:
    """The compatibility report of `refs` (and a pivot checkpoint), reading for Hub repos only their
    config, tokenizer and side files and their safetensors headers. `.bin`-only repos have no header:
    their weights are downloaded to check them (and listed in `downloaded_to_check`)."""
    sources = plan_refs([*refs, *([pivot_ref] if pivot_ref else [])], token=token)
    lights = [s if isinstance(s, Ingredient) else fetch_light(s, token=token) for s in sources]
    refused = [line for s, light in zip(sources, lights)
               for line in config_refusals(s.ref, Checkpoint.read_config(light.path, s.ref))]
    if refused:  # config.json alone says no: not even the headers are read
        return CheckedInputs(sources=sources, lights=lights, n_ingredients=len(refs), downloaded_to_check=[],
                             report=CompatibilityReport(names=[s.ref for s in sources], errors=refused))
    checkpoints, fetched = [], []
    for source, light in zip(sources, lights):
        ckpt = None
        if isinstance(source, HubSource) and source.sha is not None:
            ckpt = _named(source.ref, lambda: header_checkpoint(source, light, variant=variant, token=token))
        if ckpt is None:
            if isinstance(source, HubSource):
                fetched.append(source.ref)
                light = fetch_weights(source, light, variant=variant, token=token)
            ckpt = Checkpoint(light.path, name=source.ref, variant=variant)
        checkpoints.append(ckpt)
    n = len(refs)
    report = check_compatibility(checkpoints[:n], pivot=checkpoints[n] if pivot_ref else None,
                                 allow_dtype_mismatch=allow_dtype_mismatch)
    report.notes += [f"{ref} has .bin weights (no header to read): downloaded to check it" for ref in fetched]
    return CheckedInputs(sources=sources, lights=lights, report=report, n_ingredients=n, downloaded_to_check=fetched)


def open_inputs(checked: CheckedInputs, *, variant: str | None = None, token: str | None = None,
                allow_dtype_mismatch: bool = False) -> Inputs:
    """After the check passed: download what is missing (announced, disk checked first) and open it all."""
    if not checked.report.ok:
        raise IncompatibleCheckpointsError(checked.report.summary(), report=checked.report)
    remote = [(s, light) for s, light in zip(checked.sources, checked.lights) if isinstance(s, HubSource)]
    needed = download_size([s for s, _ in remote], [light for _, light in remote], variant)
    if needed:
        logger.info("downloading %s of weights from %d repo(s)", format_size(needed), len(remote))
        check_disk_space(needed, hub_cache())
    resolved = [s if isinstance(s, Ingredient) else fetch_weights(s, light, variant=variant, token=token)
                for s, light in zip(checked.sources, checked.lights)]
    n = checked.n_ingredients
    opened = [Checkpoint(i.path, name=i.ref, variant=variant) for i in resolved]
    report = check_compatibility(opened[:n], pivot=opened[n] if len(opened) > n else None,
                                 allow_dtype_mismatch=allow_dtype_mismatch)
    if not report.ok:  # the weights say otherwise than their headers did: refuse all the same
        raise IncompatibleCheckpointsError(report.summary(), report=report)
    return Inputs(ingredients=resolved[:n], pivot=resolved[n] if len(resolved) > n else None,
                  checkpoints=report.checkpoints, pivot_checkpoint=report.pivot, report=report)


def _named(ref: str, build):
    try:
        return build()
    except CheckpointError as err:
        raise CheckpointError(f"{ref}: {err}", path=getattr(err, "path", None)) from err



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
    """Where the output's tokenizer, chat template and processor files come from (`--tokenizer-source`)."""
    if source == "pivot":
        if inputs.pivot is not None:
            return inputs.pivot.path
        return inputs.ingredients[pivot if isinstance(pivot, int) else 0].path
    if source == "first":
        return inputs.ingredients[0].path
    if isinstance(source, int):
        return inputs.ingredients[source].path
    planned = plan_refs([source], token=token)[0]
    return (planned if isinstance(planned, Ingredient) else fetch_light(planned, token=token)).path
