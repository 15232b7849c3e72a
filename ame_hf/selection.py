"""Choosing between models on validation data: candidates ranked by a direction-aware metric, the greedy
soup command (its walk is `greedy.py`), and the output that is a copy of a selected ingredient."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .card import add_card_section, selection_card, update_card
from .config import AmeConfig
from .errors import InvalidConfigError
from .evaluation import (TextData, LabelledData, check_scorable, default_metric, evaluate_model, load_data, sort_key,
                         task_for_models)
from .finish import copy_model_files
from .full_models import FullModels, ResolvedModel, fetch_models, input_paths, resolve_models
# The greedy soup's walk; `tune` imports it from here too.
from .greedy import GreedySoup, greedy_label, greedy_section, run_greedy_soup, soup_config  # noqa: F401
from .inputs import InputStage
from .output import RUN_FILE, check_output_dir, make_staging_dir, publish
from .recipe import write_selection_file
from .records import Ingredient
from .resolve import local_inputs

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One model that selection chooses between, and its validation score.

    Attributes:
        label: how tables name it.
        score: its validation score.
        config: the AME config it was merged with (None for a single ingredient).
        ingredient: the ingredient index, for a single ingredient.
        kept: for the greedy soup, the ingredient indices it averages.
    """

    label: str
    score: float
    config: AmeConfig | None = None
    ingredient: int | None = None
    kept: list[int] | None = None

    def rank_key(self, metric: str = "accuracy") -> tuple[float, int]:
        """Larger is better: the direction-aware score, then the kind.

        Ties go to the soup, then the greedy soup, then AME, then a single ingredient: a merge uses
        the experts, and a tie on a small validation set says nothing in favour of one of them.

        Args:
            metric: the metric of the score (its direction decides "larger").

        Returns:
            `(direction-aware score, kind)`, to compare with `max` or `sorted`.

        >>> Candidate("soup", 0.9, config=AmeConfig.soup()).rank_key() > Candidate("ingredient 0", 0.9,
        ...                                                                         ingredient=0).rank_key()
        True
        """
        if self.kept is not None:
            kind = 2 if self.config is not None else 0  # a greedy soup of one is that ingredient
        elif self.config is None:
            kind = 0
        else:
            kind = 3 if self.config.is_soup else 1
        return (sort_key(self.score, metric), kind)


def best_candidate(candidates: Sequence[Candidate], metric: str) -> Candidate:
    """The best candidate for `metric` (highest accuracy, lowest loss, ...); among equals, by kind, then
    the first (grid order).

    Args:
        candidates: the scored candidates, in grid order.
        metric: the metric of their scores.

    Returns:
        The best one.

    Raises:
        InvalidConfigError: there are no candidates.

    >>> best_candidate([Candidate("a", 2.0), Candidate("b", 1.5)], "loss").label
    'b'
    """
    if not candidates:
        raise InvalidConfigError("nothing to select from")
    return max(candidates, key=lambda c: c.rank_key(metric))


def ranked(candidates: Sequence[Candidate], metric: str) -> list[Candidate]:
    """The candidates best first (stable: equals keep their order).

    Args:
        candidates: the scored candidates.
        metric: the metric of their scores.

    Returns:
        A new list.

    >>> [c.label for c in ranked([Candidate("a", 0.5), Candidate("b", 0.7)], "accuracy")]
    ['b', 'a']
    """
    return sorted(candidates, key=lambda c: c.rank_key(metric), reverse=True)


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
                    config: AmeConfig | None = None) -> Selection:
    """What `tune` and `greedy_soup` share, every check before any weight is downloaded: `--out` (before and after
    resolving), the ingredients checked as a merge checks them (adapters against their base), the task every model
    can do, its metric and the data loaded; then the weights fetched (announced, disk checked). `config` holds the
    output options (variant, tokenizer source, dtype) the merges will run with."""
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
    check_scorable([m.tokenizer for m in models], task)
    fetch_models(models)
    resolved = [m.ingredient for m in models]
    return Selection(models=models, task=task, metric=default_metric(task, metric), val=val, test=test,
                     refs=[i.pinned_ref if i.repo_id else str(i.path) for i in resolved],
                     names=[i.display_name for i in resolved], stage=stage)


@dataclass(frozen=True, kw_only=True)
class GreedySoupResult:
    """What `greedy_soup` wrote: the output, the kept ingredient indices, the trace, and held-out scores.

    Attributes:
        path: the output folder.
        kept: the ingredient indices averaged (in the user's order).
        score: validation score of the output.
        steps: `(ingredient, validation score with it, kept?)` in the order tried.
        ingredient_scores: each ingredient's validation score.
        test_scores: `{"greedy soup": ..., "best ingredient": ...}` on `test_data` (empty without it).
    """

    path: Path
    kept: list[int]
    score: float
    steps: list[tuple[int, float, bool]]
    ingredient_scores: list[float]
    test_scores: dict[str, float]


def greedy_soup(
    ingredients: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    data: str | os.PathLike | LabelledData | TextData,
    test_data: str | os.PathLike | LabelledData | TextData | None = None,
    task: str | None = None,
    metric: str | None = None,
    config: AmeConfig | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> GreedySoupResult:
    """Write the greedy soup of the ingredients on validation `data` (`ame-hf merge --greedy-soup`).

    Each ingredient is evaluated once; each trial soup is a real merge (SGD, lr 1, harmonic) of the
    ingredients kept so far plus one, and only the kept soup stays on disk. The output is that merge,
    with its `ame_config.yaml` (listing the kept ingredients) and a card naming them; when no soup beats
    the best single ingredient, it is a marked copy of that ingredient.

    Args:
        ingredients: local directories and/or Hub repo IDs.
        out_dir: the output folder.
        data: validation data (for the task; see `ame_hf.evaluate`).
        test_data: held-out data: scores the output and the best ingredient, into the card's model-index.
        task: default: from the ingredients' architecture.
        metric: default: `accuracy`, or `loss` for text-generation (lower is better).
        config: output options only (dtype, max_shard_size, variant, ...).
        max_length, batch_size, device: of the evaluation (see `evaluation.evaluate_model`).
        token: Hub token.
        overwrite: replace a previous ame-hf output.
        log: called with one line per step.

    Returns:
        A `GreedySoupResult`.

    Raises:
        AmeError: an option that decides the weights (`InvalidConfigError`), an `--out` that may not be written
            (`OutputError`), ingredients, data or a task that do not fit, before any merge; what a merge refuses.

    >>> greedy_soup(["org/a", "org/b", "org/c"], "greedy", data="val.jsonl").kept  # doctest: +SKIP
    [0, 2]
    """
    out = Path(out_dir)
    soup_config(config)  # a weight option is refused before anything is downloaded
    sel = start_selection(ingredients, out, overwrite, data=data, test_data=test_data, task=task, metric=metric,
                          base=config.base if config is not None else None, token=token)
    task, metric, val, test, refs = sel.task, sel.metric, sel.val, sel.test, sel.refs
    evaluate = lambda path, d: evaluate_model(str(path), d, task, metric, max_length=max_length,  # noqa: E731
                                              batch_size=batch_size, device=device)
    scratch = make_staging_dir(out)
    try:
        full = FullModels(sel.models, scratch / "ingredients", token=token, device=device)
        scores = full.score_each(lambda p: evaluate(p, val), metric)
        trace = run_greedy_soup(refs, scores, lambda p: evaluate(p, val), metric, scratch, out.absolute().name,
                                config=config, token=token, log=log)
        best = trace.steps[0][0]
        # The best ingredient's, before an adapter's full model moves into the output.
        best_on_test = evaluate(full.path(best), test) if test is not None else None
        if trace.path is None:
            final = write_selected(scratch / "ingredient", full, best, refs, len(refs), by="the greedy soup")
        else:
            final = trace.path
        tests = _greedy_test_scores(trace, best_on_test, lambda: evaluate(final, test))
        _write_greedy_card(final, trace, sel, scores, tests, model_name=out.absolute().name)
        publish(final, out, overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return GreedySoupResult(path=out, kept=trace.kept, score=trace.score, steps=trace.steps,
                            ingredient_scores=scores, test_scores=tests)


def _greedy_test_scores(trace: GreedySoup, best_on_test: float | None,
                        score_output: Callable[[], float]) -> dict[str, float]:
    """`{"greedy soup": ..., "best ingredient": ...}` on the test data (empty without it). When only the best
    ingredient is kept it is the greedy soup, already scored: the output is scored only when it is a merge."""
    if best_on_test is None:
        return {}
    return {"greedy soup": best_on_test if trace.path is None else score_output(), "best ingredient": best_on_test}


def _write_greedy_card(folder: Path, trace: GreedySoup, sel: Selection, scores: Sequence[float],
                       tests: dict[str, float], *, model_name: str) -> None:
    """The greedy soup's scores (validation, and test when given) and its trace, into the card of `folder`."""
    label = greedy_label(trace.kept)
    best = trace.steps[0][0]
    rows = [(label, trace.score)] + [(f"ingredient {i}: {sel.names[i]}", s) for i, s in enumerate(scores)]
    test_results = [(label, tests["greedy soup"]), (f"best ingredient: {sel.names[best]}", tests["best ingredient"])
                    ] if tests else None
    update_card(folder, rows, task=sel.task, dataset=sel.val.name, metric=sel.metric, model_name=model_name,
                selected_from=len(trace.steps), selected_by="the greedy soup", test_results=test_results,
                test_dataset=sel.test.name if sel.test is not None else None)
    add_card_section(folder, "## Greedy soup", greedy_section(trace, sel.names, sel.metric))
