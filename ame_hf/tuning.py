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
from typing import Callable, Sequence

from .card import add_card_section, update_card
from .config import AmeConfig
from .errors import InvalidConfigError
from .evaluation import LabelledData, TextData, evaluate_model
from .full_models import FullModels
from .merging import merge
from .output import make_staging_dir, publish
from .selection import (Candidate, best_candidate, greedy_label, greedy_section, ranked, run_greedy_soup,
                        start_selection, write_selected)

__all__ = ["Candidate", "TuneResult", "default_grid", "tune"]

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


@dataclass(frozen=True)
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


def _label(cfg: AmeConfig) -> str:
    cfg = cfg.resolved()
    if cfg.is_soup:
        return "soup"
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
    data: str | os.PathLike | LabelledData | TextData,
    test_data: str | os.PathLike | LabelledData | TextData | None = None,
    task: str | None = None,
    metric: str | None = None,
    base: str | os.PathLike | None = None,
    budget: int = DEFAULT_BUDGET,
    grid: Sequence[AmeConfig] | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Pick the best of {soup, greedy soup, each ingredient, `budget` AME variants} on validation data.

    By construction the result is never worse on this validation data than the soup, the greedy soup or
    the best single ingredient. Each ingredient is evaluated once, each candidate as soon as it is
    merged, and only the best so far stays on disk. The card lists every candidate's score, labelled as
    the validation scores used for the selection; with `test_data`, the model-index holds the selected
    model's score on that held-out data instead (the soup's and the best ingredient's beside it).

    PEFT LoRA adapters are ingredients as in `merge`: each is scored as the full model it makes of its base,
    and when one is selected the output is that full model (not the adapter's files).

    Args:
        ingredients: local directories and/or Hub repo IDs.
        out_dir: the output folder.
        data: validation data for the task (what the choice is made on).
        test_data: held-out data that plays no part in the choice.
        task: `text-classification`, `image-classification` or `text-generation`; None infers it from
            the ingredients' architectures. Checked against every ingredient before any merge.
        metric: default `accuracy`, or `loss` (mean NLL per token, lower is better) for text-generation.
        base: the base model of the PEFT adapters among the ingredients (merge's `--base`; default: each
            adapter's `base_model_name_or_path`), for every merge and evaluation.
        budget: how many of `grid` (default `default_grid()`) to try.
        max_length, batch_size, device: of the evaluation and (device) of the merges.
        log: called with one line per candidate, and the time estimate after the first merge.

    Returns:
        A `TuneResult`.

    >>> tune(["org/a", "org/b"], "best", data="val.jsonl", task="text-classification")  # doctest: +SKIP
    """
    if budget < 0:
        raise InvalidConfigError(f"--budget must be >= 0, got {budget}")
    out = Path(out_dir)
    base = os.fspath(base) if base else None
    sel = start_selection(ingredients, out, overwrite, data=data, test_data=test_data, task=task, metric=metric,
                          base=base, token=token)
    task, metric, val, test, refs, names = sel.task, sel.metric, sel.val, sel.test, sel.refs, sel.names
    score = lambda path, d=val: evaluate_model(str(path), d, task, metric, max_length=max_length,  # noqa: E731
                                               batch_size=batch_size, device=device, progress=progress)
    configs = [AmeConfig.soup()] + list(grid if grid is not None else default_grid())[:budget]
    if base:  # the adapters' base, for every merge (the greedy soup's too)
        configs = [dataclasses.replace(cfg, base=base) for cfg in configs]
    total = len(refs) + 1 + len(configs)  # + the greedy soup
    name = out.absolute().name  # named like the output: the card's "How to use" names the merge's folder
    scratch = make_staging_dir(out)
    candidates: list[Candidate] = []
    tests: dict[str, float] = {}
    tested: dict[tuple, float] = {}  # each model scored on the test data once: ("ingredient", i), ("soup",), ...

    def test_score(key: tuple, path: Callable[[], Path]) -> float:
        if key not in tested:
            tested[key] = score(path(), test)
        return tested[key]
    kept_dir: dict[int, Path] = {}  # id(candidate) -> its folder, for the best one only
    trace = None

    def consider(cand: Candidate, folder: Path | None) -> None:
        candidates.append(cand)
        _say(log, cand)
        if folder is None:
            return
        if best_candidate(candidates, metric) is cand:
            for old in list(kept_dir.values()):
                shutil.rmtree(old.parent, ignore_errors=True)
            kept_dir.clear()
            kept_dir[id(cand)] = folder
        else:
            shutil.rmtree(folder.parent, ignore_errors=True)

    try:
        full = FullModels(sel.models, scratch / "ingredients", token=token, device=device)
        scores = full.score_each(score, metric)  # each once; the best adapter's full model stays written
        for i, s in enumerate(scores):
            consider(Candidate(f"ingredient {i}: {names[i]}", s, ingredient=i), None)
        for n, cfg in enumerate(configs):
            started = time.perf_counter()
            target = scratch / f"cand{n}" / name
            target.parent.mkdir()
            result = merge(refs, target, cfg, token=token, progress=False, device=device)
            value = score(result.path)
            if test is not None and n == 0:
                tests["soup"] = test_score(("soup",), lambda: result.path)
            consider(Candidate(_label(cfg), value, config=result.config), target)
            if n == 0:
                per = time.perf_counter() - started
                if log:
                    log(f"about {per:.1f}s per candidate (merge + evaluation): {len(configs) - 1} AME variants and "
                        f"the greedy soup ({len(refs) - 1} merges) left, about {per * (len(configs) + len(refs) - 2):.0f}s")
                trace = run_greedy_soup(refs, scores, score, metric, scratch / "greedy", name, token=token, log=log,
                                        config=AmeConfig(base=base) if base else None)
                kept = Candidate(greedy_label(trace.kept), trace.score, config=AmeConfig.soup(), kept=trace.kept)
                if trace.path is None:  # only the best ingredient kept: the greedy soup is that ingredient
                    kept.config, kept.ingredient = None, trace.kept[0]
                if test is not None:
                    tests["greedy soup"] = test_score(_key(kept), lambda: trace.path or full.path(trace.kept[0]))
                consider(kept, trace.path)
        best = best_candidate(candidates, metric)  # among equals: by kind, then grid order
        order = ranked(candidates, metric)
        val_best = best_candidate([c for c in candidates if c.config is None and c.kept is None], metric)
        if test is not None:  # before an adapter's full model may move into the output
            tests["best ingredient"] = test_score(_key(val_best), lambda: full.path(val_best.ingredient))
        if id(best) in kept_dir:
            final = kept_dir[id(best)]
        else:
            final = write_selected(scratch / "ingredient", full, best.ingredient if best.ingredient is not None
                                   else best.kept[0], refs, total)
        test_rows = None
        if test is not None:
            tests["selected"] = test_score(_key(best), lambda: final)
            test_rows = [(f"selected: {best.label}", tests["selected"]), ("soup", tests["soup"]),
                         (greedy_label(trace.kept), tests["greedy soup"]),
                         (f"best ingredient (validation): {val_best.label}", tests["best ingredient"])]
        update_card(final, [(f"selected: {best.label}", best.score)] + [(c.label, c.score) for c in order],
                    task=task, dataset=val.name, metric=metric, model_name=name, selected_from=total,
                    test_results=test_rows, test_dataset=test.name if test is not None else None)
        if best.kept is not None and trace is not None:
            add_card_section(final, "## Greedy soup", greedy_section(trace, names, metric))
        publish(final, out, overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return TuneResult(path=out, best=best, candidates=order, metric=metric, test_scores=tests)


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
