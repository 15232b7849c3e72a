"""What `tune` and the greedy soup share: every check before a merge (`start_selection`, its `Selection`), and the
output that is a copy of a selected ingredient (`copy_ingredient`, `write_selected`)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .card import selection_card
from .config import AmeConfig
from .errors import InvalidConfigError
from .evaluation import TextData, LabelledData, check_scorable, load_data, metric_for, task_for_models
from .finish import copy_model_files
from .full_models import FullModels, ResolvedModel, fetch_models, input_paths, resolve_models
from .inputs import InputStage
from .lm_harness import LmEvalTasks
from .output import RUN_FILE, check_output_dir
from .recipe import write_selection_file
from .records import Ingredient
from .resolve import local_inputs


def copy_ingredient(target: Path, ingredient: Ingredient, refs: Sequence[str], candidates: int,
                    by: str = "`ame-hf tune`", *, full: Path | None = None, base: Ingredient | None = None) -> Path:
    """When a single ingredient is selected, the output is a copy of it, with a card and a marker saying so.

    For a PEFT adapter it is the full model the adapter makes of its `base`: `full`, the folder
    `FullModels.hand_over` gave (ame-hf's own merge, moved into place), never the adapter's own files.
    The marker (`ame_config.yaml`) makes the copy ame-hf's own output (so `--overwrite` may replace it and
    `push` takes it); it is no merge recipe, and `merge --config` says so. A copy takes what `finish.may_copy`
    allows, weights included: no code, training state or hidden files.

    Args:
        target: the new output folder.
        ingredient: the selected ingredient.
        refs: every ingredient, as the card lists them.
        candidates: how many candidates it was selected from.
        by: what selected it, as Markdown.
        full: for an adapter, the folder of its full model, moved to `target`.
        base: for an adapter, its base model.

    Returns:
        `target`.
    """
    if full is not None:
        shutil.move(full, target)
    else:
        # The same rule as a merge's side files, weights kept: no code, training state or hidden files.
        copy_model_files(ingredient.path, target, weights=True, skip=lambda name: name in ("README.md", RUN_FILE))
    selection_card(ingredient, list(refs), candidates, by=by, base=base).save(target / "README.md")
    write_selection_file(target / RUN_FILE, ingredient, candidates, base=base)
    return target


def write_selected(target: Path, models: FullModels, index: int, refs: Sequence[str], candidates: int,
                   by: str = "`ame-hf tune`") -> Path:
    """`copy_ingredient` of model `index`: a full checkpoint copied, an adapter's full model moved into place.

    Args:
        target: the new output folder.
        models: the selection's models.
        index: the selected one.
        refs: every ingredient, as the card lists them.
        candidates: how many candidates it was selected from.
        by: what selected it, as Markdown.

    Returns:
        `target`.
    """
    model = models.models[index]
    return copy_ingredient(target, model.ingredient, refs, candidates, by, full=models.hand_over(index),
                           base=model.base)


@dataclass(frozen=True)
class Selection:
    """What choosing between models starts from, checked before any merge or evaluation.

    Attributes:
        models: the resolved models (`full_models.resolve_models`).
        task, metric: as given or inferred (the metric knows its direction).
        val, test: the validation data, and held-out data (None without it).
        refs: each ingredient as merges take it (a pinned Hub reference or a local path).
        names: each ingredient as tables name it.
        stage: the run's `InputStage` (every merge of the selection shares it).
    """

    models: list[ResolvedModel]
    task: str
    metric: str
    val: LabelledData | TextData
    test: LabelledData | TextData | None
    refs: list[str]
    names: list[str]
    stage: InputStage = field(repr=False, compare=False)


def start_selection(ingredients: Sequence[str | os.PathLike], out: Path, overwrite: bool, *,
                    data: str | os.PathLike | LabelledData | TextData,
                    test_data: str | os.PathLike | LabelledData | TextData | None, task: str | None,
                    metric: str | None, base: str | None, token: str | None,
                    config: AmeConfig | None = None,
                    before_fetch: Callable[[Selection], None] | None = None) -> Selection:
    """What `tune` and `greedy_soup` share, every check before any weight is downloaded: `--out` (before and after
    resolving), the ingredients checked as a merge checks them (adapters against their base), the task every model
    can do, its metric and the data loaded; then the weights fetched (announced, disk checked). `config` holds the
    output options (variant, tokenizer source, dtype) the merges will run with; `before_fetch` is called with the
    `Selection` before any weight is fetched (a resumed `tune` refuses another command's journal there)."""
    check_output_dir(out, overwrite, inputs=local_inputs([*ingredients, *([base] if base else [])]))
    output = config or AmeConfig()  # the output options every merge of the selection runs with
    stage = InputStage(token=token, variant=output.variant)
    checked = stage.check(ingredients, base=base, tokenizer_source=output.tokenizer_source,
                          allow_dtype_mismatch=output.dtype != "auto")
    checked.raise_for_errors()  # incompatible ingredients: refused before a download, as merge refuses them
    models = resolve_models([os.fspath(r) for r in ingredients], base=base, stage=stage)
    check_output_dir(out, overwrite, inputs=[*checked.paths, *input_paths(models)])
    # Before any merge: a task the ingredients cannot do would only fail after the first one.
    task = task_for_models([(m.name, m.config) for m in models], task)
    load = lambda d: d if isinstance(d, (LabelledData, TextData)) else load_data(d, task)  # noqa: E731
    val, test = load(data), None if test_data is None else load(test_data)
    if isinstance(val, LmEvalTasks) and test is not None:
        raise InvalidConfigError("test_data goes with data, not with lm_eval_tasks: score the output on other "
                                 "lm-eval tasks with `ame-hf evaluate`", fields=("test_data", "lm_eval_tasks"))
    metric = metric_for(task, metric, val)
    check_scorable([m.tokenizer for m in models], task)
    resolved = [m.ingredient for m in models]
    sel = Selection(models=models, task=task, metric=metric, val=val, test=test,
                    refs=[i.pinned_ref if i.repo_id else str(i.path) for i in resolved],
                    names=[i.display_name for i in resolved], stage=stage)
    if before_fetch is not None:
        before_fetch(sel)
    fetch_models(models)
    return sel
