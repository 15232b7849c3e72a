"""The greedy soup (Wortsman et al. 2022): its walk over the ingredients on validation data, its card section and
`greedy_soup`; what every selection shares is in `choosing.py`, the ranking in `ranking.py`."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .card_results import add_card_section, update_card
from .choosing import Selection, start_selection, write_selected
from .config import WEIGHT_FIELDS, AmeConfig
from .errors import InvalidConfigError
from .evaluation import TextData, LabelledData, evaluate_model, is_better, sort_key
from .full_models import FullModels
from .in_memory import merge_model
from .inputs import InputStage
from .lm_harness import LmEvalTasks, data_or_tasks, record
from .merging import merge
from .output import make_staging_dir, publish
# Tables and `tune` import the ranking from here too.
from .ranking import Candidate, best_candidate, ranked  # noqa: F401

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class GreedySoup:
    """The trace of a greedy soup: which ingredients it kept, each step, and where its merge is.

    Attributes:
        kept: the ingredient indices averaged, in the user's order.
        score: the validation score of the kept soup (of the single best ingredient when only it is kept).
        steps: `(ingredient, validation score of the soup with it, kept?)` in the order tried; the
            first step is the best ingredient alone.
        path: the merge of the kept ingredients, when it was written to disk (it did not fit in memory).
        model: the kept merge built in memory, when it was (`kept_soup` writes it); None when only one ingredient
            is kept, or when its score came from a resumed run's journal.
    """

    kept: list[int]
    score: float
    steps: list[tuple[int, float, bool]] = field(default_factory=list)
    path: Path | None = None
    model: Any = field(default=None, repr=False)


def soup_config(config: AmeConfig | None = None) -> AmeConfig:
    """The uniform soup, keeping `config`'s output options (dtype, shard size, variant, ...).

    Args:
        config: the caller's options (None: the defaults).

    Returns:
        The soup's `AmeConfig` (SGD, lr 1, harmonic).

    Raises:
        InvalidConfigError: `config` sets an option that decides the weights (the greedy soup is a soup).
    """
    if config is None:
        return AmeConfig.soup()
    default = AmeConfig()
    changed = [f for f in WEIGHT_FIELDS if getattr(config, f) != getattr(default, f)]
    if changed:
        raise InvalidConfigError(f"the greedy soup is a uniform soup of the ingredients it keeps; drop "
                                 f"{', '.join(changed)}", fields=changed)
    return AmeConfig.soup(**{f.name: getattr(config, f.name) for f in dataclasses.fields(AmeConfig)
                             if f.name not in WEIGHT_FIELDS})


def run_greedy_soup(refs: Sequence[str], scores: Sequence[float], score: Callable[[Any], float], metric: str,
                    scratch: Path, name: str, *, config: AmeConfig | None = None, token: str | None = None,
                    log: Callable[[str], None] | None = None, stage: InputStage | None = None,
                    recorded_at: Path | None = None, task: str | None = None, device: str | None = None,
                    memo: Callable[[str, Callable[[], float]], float] | None = None) -> GreedySoup:
    """The greedy soup: ingredients sorted by validation score (best first); each is added to the running
    uniform soup only if the soup's validation score does not get worse (Wortsman et al. 2022, Recipe 1).

    With `task`, each trial soup is built in memory when it fits (`in_memory.merge_model`: the tensors `merge`
    writes), scored and dropped; only the kept one is held. Otherwise it is merged into `scratch` and scored there.

    Args:
        refs: the ingredients (pinned references or local paths).
        scores: each ingredient's validation score (evaluated once, by the caller).
        score: the validation score of a merged model folder, or of a model built in memory.
        metric: the metric of the scores (its direction decides "worse").
        scratch: a folder for the trial merges that do not fit in memory; only the kept soup stays there.
        name: the folder name of each merge (the card's "How to use" names it).
        config: output options for the merges (see `soup_config`).
        stage: the run's `InputStage`, shared by the trial merges.
        recorded_at: the output folder the kept soup will be moved to (its local references are recorded
            relative to it).
        task: the evaluation task (which model class a trial in memory is); None: every trial on disk.
        device: where the merges compute.
        memo: `memo(key, compute)` gives a trial's score (a resumed `tune`'s journal: recorded, or computed now).

    Returns:
        A `GreedySoup`.

    Raises:
        InvalidConfigError: `config` sets an option that decides the weights.
    """
    cfg = soup_config(config)
    order = sorted(range(len(refs)), key=lambda i: -sort_key(scores[i], metric))  # stable: ties by index
    kept, best = [order[0]], scores[order[0]]
    trace = GreedySoup(kept=kept, score=best, steps=[(order[0], best, True)])
    if task is not None and stage is None:
        stage = InputStage(token=token, variant=cfg.variant)
    for n, i in enumerate(order[1:]):
        trial = sorted(kept + [i])
        built: list[Any] = []  # what the trial left: a model in memory, or a folder

        def compute() -> float:
            model = merge_model([refs[k] for k in trial], cfg, task, stage=stage, device=device) if task else None
            if model is not None:
                model.ame_candidate = f"greedy{n}"  # named like the folder it would have had
                built.append(model)
                return score(model)
            target = scratch / f"greedy{n}" / name
            target.parent.mkdir(parents=True)
            merge([refs[k] for k in trial], target, cfg, token=token, progress=False, stage=stage, device=device,
                  recorded_at=recorded_at)
            built.append(target)
            return score(target)

        value = memo(f"greedy soup {','.join(map(str, trial))}", compute) if memo else compute()
        keep = not is_better(best, value, metric)  # "does not get worse": equal is kept
        trace.steps.append((i, value, keep))
        if log:
            log(f"{value:8.4f}  greedy soup + ingredient {i}: {'kept' if keep else 'rejected'}")
        if keep:
            if trace.path is not None:
                shutil.rmtree(trace.path.parent, ignore_errors=True)
            kept, best = trial, value
            trace.model = built[0] if built and not isinstance(built[0], Path) else None
            trace.path = built[0] if built and isinstance(built[0], Path) else None
        elif built and isinstance(built[0], Path):
            shutil.rmtree(built[0].parent, ignore_errors=True)
        built.clear()
    trace.kept, trace.score = kept, best
    return trace


def kept_soup(trace: GreedySoup, refs: Sequence[str], target: Path, *, config: AmeConfig | None = None,
              token: str | None = None, stage: InputStage | None = None, device: str | None = None,
              recorded_at: Path | None = None, resume: bool = False) -> Path:
    """The folder of the greedy soup's merge (more than one ingredient kept): where it was written, or written now
    by `merge` itself (a soup kept in memory, or scored in a resumed run) into `target`; the model held is dropped.

    Args:
        trace: the greedy soup.
        refs: the ingredients.
        target: the folder to write (its parent is made).
        config: output options (see `soup_config`).
        token, stage, device: of the merge.
        recorded_at: the output folder it will become.
        resume: continue an unfinished merge of `target` (`merge`'s `resume`).

    Returns:
        The folder.
    """
    trace.model = None
    if trace.path is None:
        target.parent.mkdir(parents=True, exist_ok=True)
        trace.path = merge([refs[k] for k in trace.kept], target, soup_config(config), token=token, progress=False,
                           stage=stage, device=device, recorded_at=recorded_at, resume=resume).path
    return trace.path


def greedy_label(kept: Sequence[int]) -> str:
    """How tables and cards name a greedy soup.

    Args:
        kept: the ingredient indices it averages.

    Returns:
        The label.

    >>> greedy_label([0, 2])
    'greedy soup (kept 0, 2)'
    """
    return f"greedy soup (kept {', '.join(map(str, kept))})"


def greedy_section(trace: GreedySoup, names: Sequence[str], metric: str) -> str:
    """The card section that says which ingredients the greedy soup kept, and why.

    Args:
        trace: the greedy soup's trace.
        names: each ingredient's name, by index.
        metric: the metric of the scores.

    Returns:
        Markdown: a paragraph and the table of steps.
    """
    rows = "\n".join(f"| {k + 1} | {i}: {names[i]} | {v:.4f} | {'kept' if ok else 'rejected (worse)'} |"
                     for k, (i, v, ok) in enumerate(trace.steps))
    return (f"A **greedy soup** (Wortsman et al. 2022, *Model soups*): the ingredients sorted by validation "
            f"{metric}, each added to the running uniform soup only if the validation {metric} does not get "
            f"worse. It kept **{len(trace.kept)} of {len(names)}**: "
            f"{', '.join(f'{i} ({names[i]})' for i in trace.kept)}.\n\n"
            f"| step | ingredient added | {metric} of the soup with it (validation) | |\n|---|---|---|---|\n{rows}\n")


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
    data: str | os.PathLike | LabelledData | TextData | LmEvalTasks | None = None,
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
    lm_eval_tasks: str | Sequence[str] | None = None,
    lm_eval_include: str | os.PathLike | None = None,
    lm_eval_metric: str | None = None,
    lm_eval_limit: int | None = None,
    lm_eval_num_fewshot: int | None = None,
) -> GreedySoupResult:
    """Write the greedy soup of the ingredients on validation `data` (`ame-hf merge --greedy-soup`).

    Each ingredient is evaluated once; each trial soup is a real merge (SGD, lr 1, harmonic) of the
    ingredients kept so far plus one, built in memory when it fits (scored and dropped), and only the kept soup
    is written. The output is that merge,
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
        lm_eval_tasks, lm_eval_include, lm_eval_metric, lm_eval_limit, lm_eval_num_fewshot: lm-eval tasks as
            the score instead of `data` (see `ame_hf.evaluate`); the output keeps its lm-eval results.

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
    data = data_or_tasks(data, lm_eval_tasks=lm_eval_tasks, lm_eval_include=lm_eval_include,
                         lm_eval_metric=lm_eval_metric, lm_eval_limit=lm_eval_limit,
                         lm_eval_num_fewshot=lm_eval_num_fewshot)
    sel = start_selection(ingredients, out, overwrite, data=data, test_data=test_data, task=task, metric=metric,
                          base=config.base if config is not None else None, token=token, config=config)
    task, metric, val, test, refs = sel.task, sel.metric, sel.val, sel.test, sel.refs
    # A folder as a string, or a trial built in memory as it is.
    evaluate = lambda model, d: evaluate_model(  # noqa: E731
        str(model) if isinstance(model, (str, os.PathLike)) else model, d, task, metric, max_length=max_length,
        batch_size=batch_size, device=device)
    scratch = make_staging_dir(out)
    try:
        full = FullModels(sel.models, scratch / "ingredients", token=token, device=device)
        scores = full.score_each(lambda p: evaluate(p, val), metric)
        trace = run_greedy_soup(refs, scores, lambda p: evaluate(p, val), metric, scratch, out.absolute().name,
                                config=config, token=token, log=log, stage=sel.stage, recorded_at=out, task=task,
                                device=device)
        best = trace.steps[0][0]
        # The best ingredient's, before an adapter's full model moves into the output.
        best_on_test = evaluate(full.path(best), test) if test is not None else None
        if len(trace.kept) == 1:
            scored = full.path(best)  # where the output was scored (before a move)
            final = write_selected(scratch / "ingredient", full, best, refs, len(refs), by="the greedy soup")
        else:  # only the kept soup is written, by `merge` itself (its trials were scored in memory when they fit)
            in_memory = trace.path is None
            final = kept_soup(trace, refs, scratch / "greedy" / out.absolute().name, config=config, token=token,
                              stage=sel.stage, device=device, recorded_at=out)
            scored = None if in_memory else final  # lm-eval's results of a model in memory are not kept: scored again
        tests = _greedy_test_scores(trace, best_on_test, lambda: evaluate(final, test))
        _write_greedy_card(final, trace, sel, scores, tests, model_name=out.absolute().name)
        if isinstance(val, LmEvalTasks):
            record(final, val, scored_as=scored, device=device,
                   batch_size=batch_size, max_length=max_length)
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
    return {"greedy soup": best_on_test if len(trace.kept) == 1 else score_output(), "best ingredient": best_on_test}


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
