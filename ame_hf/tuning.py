"""`tune`: generate candidates (the soup, the greedy soup, every ingredient, a grid of AME variants), score
each on validation data as it is made, and write the best with the search table in its card."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ._options import tune_options
from .adapter_out import base_of, checked_base, full_model_config, save_adapter
from .card_results import add_card_section, update_card
from .config import AmeConfig
from .evaluation import LabelledData, TextData, evaluate_model
from .full_models import FullModels
from .grid import base_grid, candidate_configs, candidate_label as _label, default_grid
from .guard import DEFAULT_SELECTION, Examples, check_selection
from .in_memory import merge_model
from .inputs import InputStage
from .lm_harness import LmEvalTasks, data_or_tasks, record
from .merging import merge
from .output import make_staging_dir, publish
from . import tune_journal
from .selection import (Candidate, GreedySoup, Selection, best_candidate, greedy_label, greedy_section, kept_soup,
                        ranked, run_greedy_soup, start_selection, write_selected)
from .tune_journal import SELECTED, ScoreJournal, tune_key

__all__ = ["Candidate", "TuneResult", "base_grid", "default_grid", "tune"]

logger = logging.getLogger(__name__)
DEFAULT_BUDGET = 12


@dataclass(frozen=True, kw_only=True)
class TuneResult:
    """The chosen model, every candidate's validation score (best first) and the held-out scores.

    Attributes:
        path: the output folder (the best candidate).
        best: the selected `Candidate`.
        candidates: all candidates, best first for the metric's direction.
        metric: the metric of the scores (`higher_is_better(metric)` says which way).
        test_scores: on `test_data`, data that played no part in the choice: `selected`, `soup`,
            `greedy soup` and `best ingredient` (the one best on validation); empty without test data.
    """

    path: Path
    best: Candidate
    candidates: list[Candidate]
    metric: str = "accuracy"
    test_scores: dict[str, float] = field(default_factory=dict)


def tune(
    ingredients: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    data: str | os.PathLike | LabelledData | TextData | LmEvalTasks | None = None,
    test_data: str | os.PathLike | LabelledData | TextData | None = None,
    task: str | None = None,
    metric: str | None = None,
    base: str | os.PathLike | None = None,
    budget: int = DEFAULT_BUDGET,
    grid: Sequence[AmeConfig] | None = None,
    config: AmeConfig | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    lm_eval_tasks: str | Sequence[str] | None = None,
    lm_eval_include: str | os.PathLike | None = None,
    lm_eval_metric: str | None = None,
    lm_eval_limit: int | None = None,
    lm_eval_num_fewshot: int | None = None,
    resume: bool = False,
    selection: str = DEFAULT_SELECTION,
) -> TuneResult:
    """Pick the best of {soup, greedy soup, each ingredient, `budget` AME variants} on validation data; with a known
    base (`base`, or the adapters' own), also task arithmetic and TIES from it (`base_grid`).

    With `selection="best"` the result is never worse on this validation data than the soup, the greedy soup or
    the best single ingredient; the default keeps the soup unless a lead over it is beyond noise. Each ingredient is evaluated once, each candidate as soon as it is
    merged, and only the best so far stays on disk. The card lists every candidate's score, labelled as
    the validation scores used for the selection; with `test_data`, the model-index holds the selected
    model's score on that held-out data instead (the soup's and the best ingredient's beside it).

    PEFT LoRA adapters are ingredients as in `merge`: each is scored as the full model it makes of its base,
    and when one is selected the output is that full model (not the adapter's files). With
    `config=AmeConfig(save_as="adapter")` the selected model is written as a LoRA adapter of the base instead.

    Args:
        ingredients: local directories and/or Hub repo IDs.
        out_dir: the output folder.
        data: validation data for the task (what the choice is made on).
        test_data: held-out data that plays no part in the choice.
        task: `text-classification`, `image-classification` or `text-generation`; None infers it from
            the ingredients' architectures. Checked against every ingredient before any merge.
        metric: default `accuracy`, or `loss` (mean NLL per token, lower is better) for text-generation.
        base: the base model of the PEFT adapters among the ingredients (merge's `--base`; default: each
            adapter's `base_model_name_or_path`), for every merge and evaluation. The same as `config.base`.
        budget: how many of `grid` (default `default_grid()`) to try.
        grid: the AME variants to try, in order.
        config: output options for every merge tune runs (`dtype`, `max_shard_size`, `variant`, `compute_dtype`,
            `tokenizer_source`, `allow_nonfinite`, `base`); the options that decide the AME steps are refused
            (tune tries its own: `grid`). A selected single ingredient is copied as it is.
        max_length, batch_size, device: of the evaluation and (device) of the merges.
        token: Hub token for private or gated repos.
        overwrite: replace a previous ame-hf output at `out_dir`.
        progress: progress bars of the evaluations.
        log: called with one line per candidate, and the time estimate after the first merge.
        lm_eval_tasks, lm_eval_include, lm_eval_metric, lm_eval_limit, lm_eval_num_fewshot: lm-eval tasks as
            the score instead of `data` (see `ame_hf.evaluate`); the output keeps the selected model's lm-eval
            results (`lm_eval_results.json`) and its task scores in the card's model-index.
        resume: continue the tune of `out_dir` that stopped (kill -9, power loss, an error) when started with the
            same ingredients, data and options: the scores it recorded are not computed again, and the result is
            the one an uninterrupted tune gives. Without it, a stopped tune's staging folder is removed.
        selection: `guarded` (default): the candidate whose validation lead over the soup is largest beyond noise
            (a paired bound over the examples), else the soup (`ame_hf.guard`); `best`: the best validation score.

    Returns:
        A `TuneResult`.

    Raises:
        InvalidConfigError: an invalid option (before anything is read), a task the ingredients cannot do or
            unreadable data (before any merge).
        OutputError, IngredientNotFoundError, IncompatibleCheckpointsError, HubError: as `merge`; with `resume`, an
            unfinished tune of `out_dir` started with another command (`OutputError`, before any download).

    >>> tune(["org/a", "org/b"], "best", data="val.jsonl", task="text-classification")  # doctest: +SKIP
    >>> tune(["org/a", "org/b"], "best", data="val.jsonl", config=AmeConfig(dtype="bfloat16"))  # doctest: +SKIP
    """
    output = tune_options(ingredients, budget=budget, config=config, base=base, max_length=max_length,
                          batch_size=batch_size)
    book = Examples(check_selection(selection))
    out = Path(out_dir)
    data = data_or_tasks(data, lm_eval_tasks=lm_eval_tasks, lm_eval_include=lm_eval_include,
                         lm_eval_metric=lm_eval_metric, lm_eval_limit=lm_eval_limit,
                         lm_eval_num_fewshot=lm_eval_num_fewshot)
    taken: list[Path | None] = []

    def take_up(sel: Selection) -> None:  # before any download: another command's unfinished tune is refused
        key = tune_key(sel, _configs(sel, output, grid, budget), output, device=device, max_length=max_length,
                       batch_size=batch_size, selection=selection)
        taken.extend([tune_journal.take_up(out, key) if resume else None, key])

    sel = start_selection(ingredients, out, overwrite, data=data, test_data=test_data, task=task, metric=metric,
                          base=output.base, token=token, config=output, before_fetch=take_up)
    # An adapter output: every candidate is a full model, and the pick is saved as an adapter of the base at the end.
    adapter_base = checked_base(sel.stage, sel.refs, output) if output.save_as == "adapter" else None
    configs = _configs(sel, output, grid, budget)
    search = _Search(metric=sel.metric, test=sel.test, log=log, total=len(sel.refs) + 1 + len(configs), book=book,
                     score=book.scorer(lambda model, d, each: evaluate_model(model, d, sel.task, sel.metric,
                                       max_length=max_length, batch_size=batch_size, device=device,
                                       progress=progress, per_example=each), sel.val, sel.metric))
    # The pick of the candidates built in memory is written by `merge` itself: the bytes `merge` writes.
    search.write = lambda cfg, target: merge(sel.refs, target, cfg, token=token, progress=False, device=device,
                                             stage=sel.stage, recorded_at=out, resume=resume).path
    search.write_soup = lambda trace, target: kept_soup(trace, sel.refs, target, config=full_model_config(output),
                                                        token=token, stage=sel.stage, device=device, recorded_at=out,
                                                        resume=resume)
    name = out.absolute().name  # named like the output: the card's "How to use" names the merge's folder
    scratch = taken[0] or make_staging_dir(out)
    finished = False
    try:
        search.memo = ScoreJournal(scratch, taken[1])  # every score recorded as it is computed (`resume=True`)
        search.resumed = set(search.memo.recorded)
        full = FullModels(sel.models, scratch / "ingredients", token=token, device=device)
        scores = full.score_each(search.score, sel.metric, memo=search.remember)  # the best adapter's full model stays
        for i, s in enumerate(scores):
            search.consider(Candidate(f"ingredient {i}: {sel.names[i]}", s, ingredient=i), None,
                            recorded=f"val ingredient {i}" in search.resumed)
        for n, cfg in enumerate(configs):
            started = time.perf_counter()
            _try_variant(search, n, cfg, sel.refs, scratch / f"cand{n}" / name, token=token, device=device,
                         stage=sel.stage, home=out, task=sel.task)
            if n == 0:  # after the soup: the time estimate, then the greedy soup
                if log and "val candidate 0" not in search.resumed:
                    per = time.perf_counter() - started
                    log(f"about {per:.1f}s per candidate (merge + evaluation): {len(configs) - 1} AME variants and "
                        f"the greedy soup ({len(sel.refs) - 1} merges) left, about "
                        f"{per * (len(configs) + len(sel.refs) - 2):.0f}s")
                _try_greedy_soup(search, full, sel.refs, scores, scratch / "greedy", name, full_model_config(output),
                                 token=token, stage=sel.stage, home=out, task=sel.task, device=device)
        best, final = _write_selected(search, full, sel, scratch, name)
        if isinstance(sel.val, LmEvalTasks):
            record(final, sel.val, scored_as=search.scored, device=device, batch_size=batch_size,
                   max_length=max_length, progress=progress)
        if adapter_base is not None:
            (scratch / "adapter").mkdir()
            save_adapter(final, scratch / "adapter" / name, base_of(sel.stage, adapter_base), output, overwrite=False)
            full, final = final, scratch / "adapter" / name
            if isinstance(sel.val, LmEvalTasks):  # the adapter's results are its full model's
                record(final, sel.val, scored_as=full)
        if log and search.memo.reused:
            log(f"resumed: {search.memo.reused} score(s) taken from the journal of the tune that stopped")
        publish(final, out, overwrite)
        finished = True
    finally:
        if finished or not resume:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            logger.warning("the scores computed so far are kept in %s: run the same command with --resume "
                           "(Python: resume=True) to continue", scratch)
    return TuneResult(path=out, best=best, candidates=ranked(search.candidates, sel.metric), metric=sel.metric,
                      test_scores=search.tests)


def _configs(sel: Selection, output: AmeConfig, grid: Sequence[AmeConfig] | None, budget: int) -> list[AmeConfig]:
    """The candidates' configs: the soup, the base grid when a base is known, the first `budget` of the grid."""
    known_base = output.base is not None or any(m.is_adapter for m in sel.models)
    extra = base_grid(len(sel.refs)) if known_base and grid is None else []
    return candidate_configs([*extra, *(grid if grid is not None else default_grid())], budget + len(extra),
                             full_model_config(output))


@dataclass
class _Search:
    """The state of one `tune`: the candidates so far, the folder of the best one (the only one kept on
    disk), and the test scores (each model scored on the test data once)."""

    metric: str
    score: Callable[..., float]
    test: LabelledData | TextData | None
    log: Callable[[str], None] | None
    total: int  # how many candidates there will be (for the card)
    candidates: list[Candidate] = field(default_factory=list)
    kept_dir: dict[int, Path] = field(default_factory=dict)  # id(candidate) -> its folder, for the best one only
    tests: dict[str, float] = field(default_factory=dict)
    tested: dict[tuple, float] = field(default_factory=dict)  # ("ingredient", i), ("soup",), ... -> test score
    trace: GreedySoup | None = None
    write: Callable[[AmeConfig, Path], Path] | None = None  # writes a candidate built in memory (its config)
    write_soup: Callable[[GreedySoup, Path], Path] | None = None  # writes the greedy soup's kept merge
    scored: Path | None = None  # the folder the selected model was scored in
    memo: Any = None  # the run's `ScoreJournal`: each score recorded as computed, or taken from a resumed run's
    resumed: set[str] = field(default_factory=set)  # the keys of the scores a resumed run took from the journal
    book: Examples | None = None  # per-example validation scores and the selection rule (`guard`)

    def remember(self, key: str, compute: Callable[[], float]) -> float:
        """The score recorded under `key` (a resumed run's; its per-example validation scores are handed to `guard`
        as if it had just been scored), or `compute()`, recorded now with the per-example scores it gave."""
        calls = self.book.calls
        if key in self.memo.recorded:
            if key in self.memo.each:
                calls.append((("journal", key), self.memo.each[key]))
            return self.memo(key, float)
        before = len(calls)
        return self.memo(key, compute, each=lambda: (True, calls[-1][1]) if len(calls) > before else (False, None))

    def consider(self, cand: Candidate, folder: Path | None, *, recorded: bool = False) -> None:
        """Add a scored candidate; keep its folder only while it is the best."""
        self.candidates.append(cand)
        _say(self.log, cand, recorded)
        self.book.attach(cand, folder)
        best = self.book.choose(self.candidates)[0] is cand
        if folder is None:
            if best:  # an ingredient, or a candidate built in memory: a kept folder is no longer the best
                for old in list(self.kept_dir.values()):
                    shutil.rmtree(old.parent, ignore_errors=True)
                self.kept_dir.clear()
            return
        if best:
            for old in list(self.kept_dir.values()):
                shutil.rmtree(old.parent, ignore_errors=True)
            self.kept_dir.clear()
            self.kept_dir[id(cand)] = folder
        else:
            shutil.rmtree(folder.parent, ignore_errors=True)

    def test_score(self, row: str, cand: Candidate, path: Callable[[], Path]) -> None:
        """`tests[row]`: the candidate's score on the test data (scored once per model)."""
        key = _key(cand)
        if key not in self.tested:
            self.tested[key] = self.remember(f"test {key}", lambda: self.score(path(), self.test))
        self.tests[row] = self.tested[key]


def _try_variant(search: _Search, n: int, cfg: AmeConfig, refs: Sequence[str], target: Path, *,
                 token: str | None, device: str | None, stage: InputStage, home: Path, task: str) -> None:
    """Merge candidate `n` (with the run's input stage: every input read once for all candidates) into a model in
    memory, or into `target` when it cannot be, score it, and consider it (the soup, n = 0, is scored on test data)."""
    key = f"val candidate {n}"
    if key in search.resumed:  # scored before the tune stopped: not merged again unless it is the pick
        cand = Candidate(_label(cfg), search.remember(key, float), config=cfg.resolved())
        if search.test is not None and n == 0:
            search.test_score("soup", cand, lambda: _soup_again(refs, cfg, target, task=task, token=token,
                                                                 device=device, stage=stage, home=home))
        search.consider(cand, None, recorded=True)
        return
    model = merge_model(refs, cfg, task, stage=stage, device=device)
    if model is not None:  # never on disk; written at the end only if it is the pick
        model.ame_candidate = target.parent.name  # named like the folder it would have had (`cand{n}`)
        cand = Candidate(_label(cfg), search.remember(key, lambda: search.score(model)), config=cfg.resolved())
        if search.test is not None and n == 0:
            search.test_score("soup", cand, lambda: model)
        search.consider(cand, None)
        return
    target.parent.mkdir()
    # Recorded relative to the output it may become (`home`), not to the scratch folder it is written in.
    result = merge(refs, target, cfg, token=token, progress=False, device=device, stage=stage, recorded_at=home)
    cand = Candidate(_label(cfg), search.remember(key, lambda: search.score(result.path)), config=result.config)
    if search.test is not None and n == 0:
        search.test_score("soup", cand, lambda: result.path)
    search.consider(cand, target)


def _soup_again(refs: Sequence[str], cfg: AmeConfig, target: Path, *, task: str, token: str | None,
                device: str | None, stage: InputStage, home: Path) -> Any:
    """The soup of a resumed tune, built again for its test score (in memory, or written to `target`)."""
    model = merge_model(refs, cfg, task, stage=stage, device=device)
    if model is not None:
        return model
    return merge(refs, target, cfg, token=token, progress=False, device=device, stage=stage, recorded_at=home).path


def _try_greedy_soup(search: _Search, full: FullModels, refs: Sequence[str], scores: Sequence[float],
                     scratch: Path, name: str, output: AmeConfig, *, token: str | None, stage: InputStage,
                     home: Path, task: str, device: str | None) -> None:
    """Run the greedy soup (with the output options; its trials in memory when they fit) and consider it; it is a
    single ingredient when only the best one is kept."""
    trace = search.trace = run_greedy_soup(refs, scores, search.score, search.metric, scratch, name, token=token,
                                           log=search.log, config=output, stage=stage, recorded_at=home, task=task,
                                           device=device, memo=search.remember)
    kept = Candidate(greedy_label(trace.kept), trace.score, config=AmeConfig.soup(), kept=trace.kept)
    if len(trace.kept) == 1:  # only the best ingredient kept: the greedy soup is that ingredient
        kept.config, kept.ingredient = None, trace.kept[0]
    if search.test is not None:
        search.test_score("greedy soup", kept, lambda: full.path(trace.kept[0]) if len(trace.kept) == 1 else
                          trace.model if trace.model is not None else
                          kept_soup(trace, refs, scratch / name, config=output, token=token, stage=stage,
                                    device=device, recorded_at=home))
    trace.model = None  # dropped: written at the end only if it is the pick
    if trace.path is None and len(trace.kept) > 1:  # built in memory: `guard` takes the kept trial's scores
        search.book.calls.append((("greedy",), search.memo.each.get(f"greedy soup {','.join(map(str, trace.kept))}")))
    search.consider(kept, trace.path)


def _write_selected(search: _Search, full: FullModels, sel: Selection, scratch: Path,
                    name: str) -> tuple[Candidate, Path]:
    """The best candidate's folder (a merge kept on disk, or a written ingredient) with its card; and the
    test scores of the selected model and the best ingredient."""
    metric, test, trace = search.metric, search.test, search.trace
    best, why = search.book.choose(search.candidates)  # `guard`'s rule; among equals: by kind, then grid order
    val_best = best_candidate([c for c in search.candidates if c.config is None and c.kept is None], metric)
    if test is not None:  # before an adapter's full model may move into the output
        search.test_score("best ingredient", val_best, lambda: full.path(val_best.ingredient))
    target = scratch / SELECTED / name  # a resumed tune continues an unfinished merge of it (`merge`'s resume)
    if id(best) in search.kept_dir:
        final = search.scored = search.kept_dir[id(best)]
    elif best.config is not None and best.kept is None and search.write is not None:  # built in memory
        target.parent.mkdir(exist_ok=True)
        final = search.scored = search.write(best.config, target)
    elif best.config is not None and trace is not None:  # the greedy soup, kept in memory (or scored before a resume)
        final = search.scored = search.write_soup(trace, target)
    else:
        index = best.ingredient if best.ingredient is not None else best.kept[0]
        search.scored = full.path(index)  # where it was scored, before an adapter's full model moves
        final = write_selected(scratch / "ingredient", full, index, sel.refs, search.total)
    test_rows = None
    if test is not None:
        search.test_score("selected", best, lambda: final)
        test_rows = [(f"selected: {best.label}", search.tests["selected"]), ("soup", search.tests["soup"]),
                     (greedy_label(trace.kept), search.tests["greedy soup"]),
                     (f"best ingredient (validation): {val_best.label}", search.tests["best ingredient"])]
    order = ranked(search.candidates, metric)
    update_card(final, [(f"selected: {best.label}", best.score)] + [(c.label, c.score) for c in order],
                task=sel.task, dataset=sel.val.name, metric=metric, model_name=name, selected_from=search.total,
                test_results=test_rows, test_dataset=test.name if test is not None else None)
    if best.kept is not None and trace is not None:
        add_card_section(final, "## Greedy soup", greedy_section(trace, sel.names, metric))
    add_card_section(final, "## Why this pick", why)
    return best, final


def _key(cand: Candidate) -> tuple:
    """Which model a candidate is, for scoring each on the test data once: an ingredient (a greedy soup of
    one included), the soup, the greedy soup, or an AME variant (by its config)."""
    if cand.ingredient is not None:
        return ("ingredient", cand.ingredient)
    if cand.kept is not None:
        return ("greedy",)
    assert cand.config is not None
    return ("soup",) if cand.config.is_soup else ("config", cand.label)  # labels are unique within a run


def _say(log: Callable[[str], None] | None, cand: Candidate, recorded: bool = False) -> None:
    if log:
        log(f"{cand.score:8.4f}  {cand.label}{'  (recorded before the resume)' if recorded else ''}")
