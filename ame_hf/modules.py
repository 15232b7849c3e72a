"""The module folders of a sentence-transformers model (`modules.json`): those holding weights (a `Dense`, a
`LayerNorm`: part of the model as sentence-transformers loads it) checked across the ingredients like a model, and
merged by the same AME run into the output's module folders; what the weightless ones and the model's
sentence-transformers files differ in, noted."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ._differences import MISSING, file_notes, read_json, who_has
from ._model_files import CONFIG_NAME, MODULES_NAME, module_folders
from ._weight_files import BIN_SINGLE, SAFE_SINGLE
from .checkpoint import Checkpoint
from .compatibility import CompatibilityReport, check_compatibility
from .config import AmeConfig
from .fetch import is_light
from .plan import output_dtype, plan_shards
from .streaming import TensorMerger, stream_tensors
from .vocabulary import TokenizerFiles, read_tokenizer, token_ids
from .writer import create_shard_files

# The weight files sentence-transformers' modules load from their folder (`Module.load_torch_weights`).
MODULE_WEIGHTS = (SAFE_SINGLE, BIN_SINGLE)
# The model-level files of a sentence-transformers model beside `modules.json` (bookkeeping fields left out).
ST_FILES = ("config_sentence_transformers.json", "sentence_bert_config.json")
_BOOKKEEPING = ("__version__",)


@dataclass(frozen=True, kw_only=True)
class ModelFiles:
    """What the check knows of one input's files, to find its module folders.

    Attributes:
        name: the reference as the user gave it.
        path: its local folder (a Hub one's light snapshot); None for a PEFT adapter, which has no module folders.
        files: every file of a Hub repo (paths in the repo); None for a local folder, which is listed.
        open: a module folder's weights as the check reads them (a Hub one's from its headers).
    """

    name: str
    path: Path | None
    files: frozenset[str] | None
    open: Callable[[str], Checkpoint]

    @classmethod
    def of(cls, entry: Any, checkpoint: Callable[..., Checkpoint]) -> "ModelFiles | None":
        """An input stage's `Entry` (None: None), its module folders opened by `checkpoint(entry, folder=...)`."""
        if entry is None:
            return None
        files = getattr(entry.source, "files", None)
        return cls(name=entry.ref, path=None if entry.adapter is not None else entry.light.path,
                   files=frozenset(files) if files else None, open=lambda folder: checkpoint(entry, folder=folder))

    def listing(self, folder: str) -> list[str]:
        """The files under a module folder, relative to it (in subfolders too)."""
        if self.files is not None:
            return sorted(f[len(folder) + 1:] for f in self.files if f.startswith(folder + "/"))
        root = self.path / folder if self.path is not None else None
        if root is None or not root.is_dir():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@dataclass(kw_only=True, eq=False)
class ModuleFolder:
    """A module folder with weights, as the check saw it in every ingredient (and the pivot).

    Attributes:
        path: the folder in the model (`2_Dense`).
        report: its own compatibility report: the ingredients' (and the pivot's) views of its weights.
        checked: the checkpoints the check opened (ingredients, then the pivot's): upgraded once downloaded.
    """

    path: str
    report: CompatibilityReport
    checked: list[Checkpoint]


def module_config(folder: Path) -> dict[str, Any]:
    """A module folder's `config.json` (its constructor's arguments), {} when it has none."""
    config = read_json(folder / CONFIG_NAME)
    return config if isinstance(config, dict) else {}


def module_checkpoint(model: Path, folder: str, name: str) -> Checkpoint:
    """The weights of a local module folder, named `model-name/folder`."""
    return Checkpoint(model / folder, name=f"{name}/{folder}", config=module_config(model / folder))


def weighted_folders(model: ModelFiles) -> tuple[list[str], list[str]]:
    """The module folders of `model` that hold weights, in `modules.json` order, and an error for each folder whose
    weight files no module loads from it (weights in a subfolder, or under other names)."""
    if model.path is None:
        return [], []
    found, errors = [], []
    for folder in module_folders(model.path, model.name):
        weights = [f for f in model.listing(folder) if not is_light(f.rsplit("/", 1)[-1])]
        if not weights:
            continue
        if set(weights) & set(MODULE_WEIGHTS) and all("/" not in f for f in weights):
            found.append(folder)
        else:
            errors.append(f"{model.name}: module folder {folder} holds weight file(s) {', '.join(weights)}, which "
                          f"ame-hf does not merge (it merges a module folder's {' or '.join(MODULE_WEIGHTS)}); merge "
                          "sentence-transformers models whose modules keep their weights so")
    return found, errors


def check_modules(entries: Sequence[Any], pivot: Any, checkpoint: Callable[..., Checkpoint],
                  report: CompatibilityReport, *, allow_dtype_mismatch: bool = False) -> list[ModuleFolder]:
    """Check the ingredients' (and the pivot's) sentence-transformers module folders: those with weights must be
    the same folders with the same tensors (each checked as a model: names, shapes, dtypes, its config a note); what
    the model's sentence-transformers files and weightless modules (pooling, normalize) differ in is a note naming
    the file, the field and whose file the output takes. Errors and notes go to `report`.

    Args:
        entries, pivot: the input stage's `Entry`s of the ingredients and of the pivot checkpoint (or None).
        checkpoint: the stage's reader of a module folder's weights, `checkpoint(entry, folder=...)`.

    Returns:
        The module folders to merge (none when `report` has errors).
    """
    models, pivot = [ModelFiles.of(e, checkpoint) for e in entries], ModelFiles.of(pivot, checkpoint)
    names = [m.name for m in models]
    found = [weighted_folders(m) for m in models]
    report.errors += [e for _, errors in found for e in errors]
    folders = [f for f, _ in found]
    if any(f != folders[0] for f in folders):
        report.errors.append(f"the sentence-transformers module folders with weights differ: {who_has(names, folders)}"
                             "; their weights are part of the model as sentence-transformers loads it: merge models "
                             "with the same modules")
    if report.errors:
        return []
    source = report.config_source()
    _side_notes(models, folders[0], report, source.name)
    pivot_folders = weighted_folders(pivot)[0] if pivot is not None else []
    if folders[0] and source is report.pivot and pivot_folders != folders[0]:
        report.errors.append(f"the output takes its config and side files from the pivot {source.name}, which lacks "
                             f"the ingredients' module folder(s) {', '.join(folders[0])}: choose pivot='mean' (or 'first', "
                             "or an ingredient index), or a pivot with the same modules")
        return []
    out = []
    for folder in folders[0]:
        views = [m.open(folder) for m in models]
        pivot_view = pivot.open(folder) if pivot is not None and folder in pivot_folders else None
        if pivot is not None and pivot_view is None:
            report.notes.append(f"pivot {pivot.name} has no module folder {folder} with weights: its tensors start "
                                "from the mean of the ingredients")
        tokens = [token_ids(read_tokenizer(v.path)) for v in views]
        if any(t != tokens[0] for t in tokens):
            report.errors.append(f"module folder {folder} holds a tokenizer that differs between {', '.join(names)}: "
                                 "its rows cannot be matched by token; merge models with one tokenizer there")
            continue
        checked = [*views, *([pivot_view] if pivot_view is not None else [])]
        sub = check_compatibility(views, pivot=pivot_view, allow_dtype_mismatch=allow_dtype_mismatch,
                                  tokenizers=[TokenizerFiles()] * len(checked), pivot_index=report.pivot_index)
        report.errors += sub.errors
        report.notes += sub.notes
        out.append(ModuleFolder(path=folder, report=sub, checked=checked))
    return [] if report.errors else out


def _side_notes(models: Sequence[ModelFiles], weighted: list[str], report: CompatibilityReport, taken: str) -> None:
    """Notes on `modules.json` (which modules), the sentence-transformers files and every JSON file of the weightless
    module folders (a pooling mode, a normalize): one per field, naming whose file the output takes."""
    paths = [m.path for m in models]
    if not any(p is not None and (p / MODULES_NAME).is_file() for p in paths):
        return
    names = [m.name for m in models]
    lists = [read_json(p / MODULES_NAME) if p is not None else MISSING for p in paths]
    if any(x != lists[0] for x in lists):
        report.notes.append(f"{MODULES_NAME}: {who_has(names, lists, _modules_shown)}; the output takes {taken}'s")
    for file in ST_FILES:
        report.notes += file_notes(file, names, paths, taken=taken, skip=_BOOKKEEPING)
    weightless = dict.fromkeys(f for m in models if m.path is not None for f in module_folders(m.path, m.name)
                               if f not in weighted)
    for folder in weightless:
        files = sorted({f for m in models for f in m.listing(folder) if f.endswith(".json") and "/" not in f})
        for file in files:
            report.notes += file_notes(f"{folder}/{file}", names, paths, taken=taken, skip=_BOOKKEEPING)


def _modules_shown(modules: Any) -> str:
    if modules is MISSING:
        return "none"
    try:
        return "[" + ", ".join(f"{m.get('path') or '.'}: {str(m.get('type')).rsplit('.', 1)[-1]}" for m in modules) + "]"
    except (AttributeError, TypeError):
        return repr(modules)


def merge_module_folders(modules: Sequence[ModuleFolder], staging: Path, config: AmeConfig, order: list[list[int]],
                         device: torch.device, *, pivot: Any, stamp: dict[str, str], max_memory: int) -> None:
    """Run the merge's AME (same optimizer, order and pivot) over each module folder's weights, written as the one
    `model.safetensors` sentence-transformers loads from the output's module folder (beside the config the finish
    copies).

    Args:
        pivot: the merge's pivot for a module folder the pivot checkpoint lacks: `mean`, or an ingredient index.
    """
    for module in modules:
        views = module.report.checkpoints
        tensors = {n: views[0].info(n) for n in views[0].names()}
        plan = plan_shards([(n, i.shape, output_dtype(config, i.dtype)) for n, i in tensors.items()], sys.maxsize,
                           stamp)
        target = staging / module.path
        target.mkdir(parents=True, exist_ok=True)
        create_shard_files(target, plan)
        merger = TensorMerger(views, module.report.pivot if module.report.pivot is not None else pivot, config, order,
                              device, max_memory=max_memory)
        stream_tensors(merger, sorted(tensors), target, plan, show=False)
