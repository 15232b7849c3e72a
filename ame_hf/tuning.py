"""`tune`: generate candidates (the soup, the greedy soup, every ingredient, a grid of AME variants), score
each on validation data as it is made, and write the best with the search table in its card."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ._options import tune_options
from .adapter_out import base_of, checked_base, full_model_config, save_adapter
from .card_results import add_card_section, update_card
from .config import OUTPUT_FIELDS, AmeConfig
from .evaluation import LabelledData, TextData, evaluate_model
from .full_models import FullModels
from .in_memory import merge_model
from .inputs import InputStage
from .lm_harness import LmEvalTasks, data_or_tasks, record
from .merging import merge
from .output import make_staging_dir, publish
from .selection import (Candidate, GreedySoup, Selection, best_candidate, greedy_label, greedy_section, ranked,
                        run_greedy_soup, start_selection, write_selected)

__all__ = ["Candidate", "TuneResult", "base_grid", "default_grid", "tune"]

logger = logging.getLogger(__name__)
DEFAULT_BUDGET = 12


def _variant(optimizer: str, rel: float | None = None, *, pivot: str = "mean", order: str = "given",
             epochs: int = 1, momentum: float | None = None, lr: float | None = None) -> AmeConfig:
    shuffle = order == "shuffle"
    common = dict(pivot=pivot, order="given" if shuffle else order, shuffle=shuffle, epochs=epochs)
    if momentum is not None:
        return AmeConfig(optimizer="sgd", lr=1.0, schedule="harmonic", optimizer_args={"momentum": momentum}, **common)
    return AmeConfig(optimizer=optimizer, relative_lr=rel, lr=lr, **common)


def default_grid() -> list[AmeConfig]:
    """AME variants in the order they are tried (a `--budget` keeps the first ones).

    The first 12 (the default budget) span the space on their own: Adam, Adagrad, RMSprop and SGD with
    momentum; relative steps from 0.01 to 1; pivot `mean` and `first`; the given, reversed and shuffled
    orders; 1 and 3 epochs. On the held-out ViT benchmark of issue 15 the selections that beat the soup
    were mostly such candidates (relative lr 0.1-1, pivot first, reversed order, 3 epochs). The rest is
    a seeded shuffle of the full product, so any larger budget keeps exploring evenly.
    """
    first = [
        _variant("adam", 0.05),
        _variant("adam", 0.3, pivot="first", order="reverse"),
        _variant("adagrad", 0.1, order="reverse"),
        _variant("rmsprop", 0.02, order="shuffle", epochs=3),
        _variant("sgd", momentum=0.5, pivot="first", order="reverse"),
        _variant("adam", 1.0, order="shuffle", epochs=3),
        _variant("adagrad", 0.5, pivot="first", epochs=3),
        _variant("rmsprop", 0.2, pivot="first", order="reverse"),
        _variant("adam", 0.1, order="reverse", epochs=3),
        _variant("sgd", momentum=0.9, order="shuffle", epochs=3),
        _variant("adagrad", 1.0, pivot="first", order="shuffle"),
        _variant("adam", 0.01, pivot="first"),
    ]
    rest = [_variant(opt, rel, pivot=pivot, order=order, epochs=epochs)
            for opt in ("adam", "adagrad", "rmsprop") for rel in (0.02, 0.1, 0.3, 1.0)
            for pivot in ("mean", "first") for order in ("given", "reverse", "shuffle") for epochs in (1, 3)]
    rest += [_variant("sgd", momentum=m, pivot=pivot, order=order) for m in (0.5, 0.9)
             for pivot in ("mean", "first") for order in ("given", "reverse", "shuffle")]
    rest += [_variant("adam", lr=lr, pivot=pivot, order=order) for lr in (0.01, 0.001)
             for pivot in ("mean", "first") for order in ("given", "reverse")]
    random.Random(15).shuffle(rest)
    return first + [cfg for cfg in rest if cfg not in first]


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


def base_grid(n: int) -> list[AmeConfig]:
    """The merges known from mergekit, from the base (`pivot="base"`): task arithmetic (the mean task vector
    scaled by 1.5 and 2: `lr`) and TIES (density 0.2 and 0.5, the disjoint mean), as one SGD step over all `n`
    ingredients. `tune` tries them when a base is known (`base=`, or the adapters' base).

    >>> [(c.transform, c.lr) for c in base_grid(3)]
    [('none', 1.5), ('none', 2.0), ('ties', 1.0), ('ties', 1.0)]
    """
    step = dict(optimizer="sgd", schedule="constant", batch_size=n, pivot="base")
    return ([AmeConfig(lr=scale, **step) for scale in (1.5, 2.0)]
            + [AmeConfig(lr=1.0, transform="ties", density=d, **step) for d in (0.2, 0.5)])


def _label(cfg: AmeConfig) -> str:
    cfg = cfg.resolved()
    if cfg.is_soup:
        return "soup"
    if cfg.pivot == "base" and cfg.optimizer == "sgd" and cfg.schedule == "constant" and cfg.epochs == 1:
        kind = "task arithmetic" if cfg.transform == "none" else f"{cfg.transform.upper()} density {cfg.density}"
        return f"{kind}, scale {cfg.lr:g} (one sgd step from the base)"
    lr = f"rel {cfg.relative_lr:g}" if cfg.relative_lr is not None else f"lr {cfg.lr:g}"
    extra = "".join(f" {k}={v}" for k, v in cfg.optimizer_args.items())
    order = cfg.order if isinstance(cfg.order, str) else "order " + ",".join(map(str, cfg.order))
    order = ("shuffled" if order == "given" else f"{order}, shuffled") if cfg.shuffle else order
    epochs = f" x{cfg.epochs}" if cfg.epochs > 1 else ""
    return f"{cfg.optimizer} {lr}{extra}, pivot {cfg.pivot}, {order}{epochs}"


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
) -> TuneResult:
    """Pick the best of {soup, greedy soup, each ingredient, `budget` AME variants} on validation data; with a known
    base (`base`, or the adapters' own), also task arithmetic and TIES from it (`base_grid`).

    By construction the result is never worse on this validation data than the soup, the greedy soup or
    the best single ingredient. Each ingredient is evaluated once, each candidate as soon as it is
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

    Returns:
        A `TuneResult`.

    Raises:
        InvalidConfigError: an invalid option (before anything is read), a task the ingredients cannot do or
            unreadable data (before any merge).
        OutputError, IngredientNotFoundError, IncompatibleCheckpointsError, HubError: as `merge`.

    >>> tune(["org/a", "org/b"], "best", data="val.jsonl", task="text-classification")  # doctest: +SKIP
    >>> tune(["org/a", "org/b"], "best", data="val.jsonl", config=AmeConfig(dtype="bfloat16"))  # doctest: +SKIP
    """
    output = tune_options(ingredients, budget=budget, config=config, base=base, max_length=max_length,
                          batch_size=batch_size)
    out = Path(out_dir)
    data = data_or_tasks(data, lm_eval_tasks=lm_eval_tasks, lm_eval_include=lm_eval_include,
                         lm_eval_metric=lm_eval_metric, lm_eval_limit=lm_eval_limit,
                         lm_eval_num_fewshot=lm_eval_num_fewshot)
    sel = start_selection(ingredients, out, overwrite, data=data, test_data=test_data, task=task, metric=metric,
                          base=output.base, token=token, config=output)
    # An adapter output: every candidate is a full model, and the pick is saved as an adapter of the base at the end.
    adapter_base = checked_base(sel.stage, sel.refs, output) if output.save_as == "adapter" else None
    known_base = output.base is not None or any(m.is_adapter for m in sel.models)
    extra = base_grid(len(sel.refs)) if known_base and grid is None else []
    configs = _candidate_configs([*extra, *(grid if grid is not None else default_grid())], budget + len(extra),
                                 full_model_config(output))
    search = _Search(metric=sel.metric, test=sel.test, log=log, total=len(sel.refs) + 1 + len(configs),
                     score=lambda model, d=sel.val: evaluate_model(_loadable(model), d, sel.task, sel.metric,
                                                                   max_length=max_length, batch_size=batch_size,
                                                                   device=device, progress=progress))
    # The pick of the candidates built in memory is written by `merge` itself: the bytes `merge` writes.
    search.write = lambda cfg, target: merge(sel.refs, target, cfg, token=token, progress=False, device=device,
                                             stage=sel.stage, recorded_at=out).path
    name = out.absolute().name  # named like the output: the card's "How to use" names the merge's folder
    scratch = make_staging_dir(out)
    try:
        full = FullModels(sel.models, scratch / "ingredients", token=token, device=device)
        scores = full.score_each(search.score, sel.metric)  # each once; the best adapter's full model stays written
        for i, s in enumerate(scores):
            search.consider(Candidate(f"ingredient {i}: {sel.names[i]}", s, ingredient=i), None)
        for n, cfg in enumerate(configs):
            started = time.perf_counter()
            _try_variant(search, n, cfg, sel.refs, scratch / f"cand{n}" / name, token=token, device=device,
                         stage=sel.stage, home=out, task=sel.task)
            if n == 0:  # after the soup: the time estimate, then the greedy soup
                if log:
                    per = time.perf_counter() - started
                    log(f"about {per:.1f}s per candidate (merge + evaluation): {len(configs) - 1} AME variants and "
                        f"the greedy soup ({len(sel.refs) - 1} merges) left, about "
                        f"{per * (len(configs) + len(sel.refs) - 2):.0f}s")
                _try_greedy_soup(search, full, sel.refs, scores, scratch / "greedy", name, full_model_config(output),
                                 token=token, stage=sel.stage, home=out)
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
        publish(final, out, overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return TuneResult(path=out, best=best, candidates=ranked(search.candidates, sel.metric), metric=sel.metric,
                      test_scores=search.tests)


def _candidate_configs(grid: Sequence[AmeConfig], budget: int, output: AmeConfig) -> list[AmeConfig]:
    """The soup, then the first `budget` of `grid`, each with the output options `output` sets."""
    default = AmeConfig()
    given = {f: getattr(output, f) for f in OUTPUT_FIELDS if getattr(output, f) != getattr(default, f)}
    return [dataclasses.replace(cfg, **given) for cfg in [AmeConfig.soup(), *list(grid)[:budget]]]


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
    scored: Path | None = None  # the folder the selected model was scored in

    def consider(self, cand: Candidate, folder: Path | None) -> None:
        """Add a scored candidate; keep its folder only while it is the best."""
        self.candidates.append(cand)
        _say(self.log, cand)
        best = best_candidate(self.candidates, self.metric) is cand
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
            self.tested[key] = self.score(path(), self.test)
        self.tests[row] = self.tested[key]


def _try_variant(search: _Search, n: int, cfg: AmeConfig, refs: Sequence[str], target: Path, *,
                 token: str | None, device: str | None, stage: InputStage, home: Path, task: str) -> None:
    """Merge candidate `n` (with the run's input stage: every input read once for all candidates) into a model in
    memory, or into `target` when it cannot be, score it, and consider it (the soup, n = 0, is scored on test data)."""
    model = merge_model(refs, cfg, task, stage=stage, device=device)
    if model is not None:  # never on disk; written at the end only if it is the pick
        model.ame_candidate = target.parent.name  # named like the folder it would have had (`cand{n}`)
        cand = Candidate(_label(cfg), search.score(model), config=cfg.resolved())
        if search.test is not None and n == 0:
            search.test_score("soup", cand, lambda: model)
        search.consider(cand, None)
        return
    target.parent.mkdir()
    # Recorded relative to the output it may become (`home`), not to the scratch folder it is written in.
    result = merge(refs, target, cfg, token=token, progress=False, device=device, stage=stage, recorded_at=home)
    cand = Candidate(_label(cfg), search.score(result.path), config=result.config)
    if search.test is not None and n == 0:
        search.test_score("soup", cand, lambda: result.path)
    search.consider(cand, target)


def _try_greedy_soup(search: _Search, full: FullModels, refs: Sequence[str], scores: Sequence[float],
                     scratch: Path, name: str, output: AmeConfig, *, token: str | None, stage: InputStage,
                     home: Path) -> None:
    """Run the greedy soup (with the output options) and consider it; it is a single ingredient when only the
    best one is kept."""
    trace = search.trace = run_greedy_soup(refs, scores, search.score, search.metric, scratch, name, token=token,
                                           log=search.log, config=output, stage=stage, recorded_at=home)
    kept = Candidate(greedy_label(trace.kept), trace.score, config=AmeConfig.soup(), kept=trace.kept)
    if trace.path is None:  # only the best ingredient kept: the greedy soup is that ingredient
        kept.config, kept.ingredient = None, trace.kept[0]
    if search.test is not None:
        search.test_score("greedy soup", kept, lambda: trace.path or full.path(trace.kept[0]))
    search.consider(kept, trace.path)


def _write_selected(search: _Search, full: FullModels, sel: Selection, scratch: Path,
                    name: str) -> tuple[Candidate, Path]:
    """The best candidate's folder (a merge kept on disk, or a written ingredient) with its card; and the
    test scores of the selected model and the best ingredient."""
    metric, test, trace = search.metric, search.test, search.trace
    best = best_candidate(search.candidates, metric)  # among equals: by kind, then grid order
    val_best = best_candidate([c for c in search.candidates if c.config is None and c.kept is None], metric)
    if test is not None:  # before an adapter's full model may move into the output
        search.test_score("best ingredient", val_best, lambda: full.path(val_best.ingredient))
    if id(best) in search.kept_dir:
        final = search.scored = search.kept_dir[id(best)]
    elif best.config is not None and best.kept is None and search.write is not None:  # built in memory
        target = scratch / "selected" / name
        target.parent.mkdir()
        final = search.scored = search.write(best.config, target)
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
    return best, final


def _loadable(model: Any) -> Any:
    """What `evaluate_model` takes: a folder as a string, or a model built in memory as it is."""
    return str(model) if isinstance(model, (str, os.PathLike)) else model


def _key(cand: Candidate) -> tuple:
    """Which model a candidate is, for scoring each on the test data once: an ingredient (a greedy soup of
    one included), the soup, the greedy soup, or an AME variant (by its config)."""
    if cand.ingredient is not None:
        return ("ingredient", cand.ingredient)
    if cand.kept is not None:
        return ("greedy",)
    assert cand.config is not None
    return ("soup",) if cand.config.is_soup else ("config", id(cand))


def _say(log: Callable[[str], None] | None, cand: Candidate) -> None:
    if log:
        log(f"{cand.score:8.4f}  {cand.label}")
