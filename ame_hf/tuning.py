"""`tune`: generate candidates (the soup, every ingredient, a grid of AME variants), score each on
validation data, and write the best with the search table in its card."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import AmeConfig
from .errors import InvalidConfigError
from .card import selection_card, update_card
from .evaluation import LabelledData, evaluate_model, load_data, read_model_config, task_for_models
from .merging import merge
from .output import RUN_FILE, check_output_dir, make_staging_dir, publish
from .recipe import write_selection_file
from .records import MergeResult
from .fetch import resolve_refs
from .resolve import local_inputs

logger = logging.getLogger(__name__)


def default_grid() -> list[AmeConfig]:
    """AME variants in the order they are tried (a `--budget` keeps the first ones).

    Interleaved so that a small budget still covers several optimizers, step sizes and orders.
    """
    grid = []
    for rel in (0.005, 0.02, 0.05, 0.1, 0.2):
        for optimizer in ("adam", "adagrad", "rmsprop"):
            grid.append(AmeConfig(optimizer=optimizer, relative_lr=rel))
            grid.append(AmeConfig(optimizer=optimizer, relative_lr=rel, shuffle=True, epochs=3))
    for momentum in (0.5, 0.9):
        grid.append(AmeConfig(optimizer="sgd", lr=1.0, schedule="harmonic", optimizer_args={"momentum": momentum}))
    return grid


@dataclass
class Candidate:
    label: str
    score: float
    config: AmeConfig | None = None     # None for a single ingredient
    ingredient: int | None = None

    @property
    def rank_key(self) -> tuple[float, int]:
        # Ties go to the soup, then to AME, then to a single ingredient: a merge uses all the
        # experts, and a tie on a small validation set says nothing in favour of one of them.
        kind = 0 if self.config is None else (2 if self.config.is_soup else 1)
        return (self.score, kind)


@dataclass(frozen=True)
class TuneResult:
    """The chosen model and every candidate's validation score (best first)."""

    path: Path
    best: Candidate
    candidates: list[Candidate]


def _label(cfg: AmeConfig) -> str:
    cfg = cfg.resolved()
    if cfg.is_soup:
        return "soup"
    lr = f"rel {cfg.relative_lr:g}" if cfg.relative_lr is not None else f"lr {cfg.lr:g}"
    extra = "".join(f" {k}={v}" for k, v in cfg.optimizer_args.items())
    order = f", shuffled x{cfg.epochs}" if cfg.shuffle else (f", {cfg.epochs} epochs" if cfg.epochs > 1 else "")
    return f"{cfg.optimizer} {lr}{extra}, pivot {cfg.pivot}{order}"


def tune(
    ingredients: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    data: str | os.PathLike | LabelledData,
    task: str | None = None,
    metric: str = "accuracy",
    budget: int = 12,
    grid: Sequence[AmeConfig] | None = None,
    token: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Pick the best of {soup, each ingredient, `budget` AME variants} on validation data.

    By construction the result is never worse on this validation data than the soup or the best
    single ingredient. The card of the output lists every candidate's score, labelled as the
    validation scores used for the selection.

    Args:
        task: `text-classification` or `image-classification`; None infers it from the
            ingredients' architectures. Checked against every ingredient before any merge.

    >>> tune(["org/a", "org/b"], "best", data="val.jsonl", task="text-classification")  # doctest: +SKIP
    """
    if budget < 0:
        raise InvalidConfigError(f"--budget must be >= 0, got {budget}")
    out = Path(out_dir)
    check_output_dir(out, overwrite, inputs=local_inputs(ingredients))
    resolved = resolve_refs([os.fspath(r) for r in ingredients], token=token)
    check_output_dir(out, overwrite, inputs=[i.path for i in resolved])
    # Before any merge: a task the ingredients cannot do would only fail after the first one.
    task = task_for_models([(i.display_name, read_model_config(i.path, i.display_name)) for i in resolved], task)
    dataset = data if isinstance(data, LabelledData) else load_data(data, task)
    refs = [i.pinned_ref if i.repo_id else str(i.path) for i in resolved]
    configs = [AmeConfig.soup()] + list(grid if grid is not None else default_grid())[:budget]
    total = len(resolved) + len(configs)
    scratch = make_staging_dir(out)
    candidates: list[Candidate] = []
    best_dir: Path | None = None
    try:
        for i, ing in enumerate(resolved):
            score = evaluate_model(str(ing.path), dataset, task, metric)
            candidates.append(Candidate(f"ingredient {i}: {ing.display_name}", score, ingredient=i))
            _say(log, candidates[-1])
        for n, cfg in enumerate(configs):
            # Named like the output: the card's "How to use" names the merge's folder.
            target = scratch / f"cand{n}" / out.absolute().name
            target.parent.mkdir()
            result = merge(refs, target, cfg, token=token, progress=False)
            score = evaluate_model(str(result.path), dataset, task, metric)
            candidates.append(Candidate(_label(cfg), score, config=result.config))
            _say(log, candidates[-1])
            best_so_far = max(candidates, key=lambda c: c.rank_key)
            if best_so_far is candidates[-1]:
                if best_dir is not None:
                    shutil.rmtree(best_dir, ignore_errors=True)
                best_dir = target
            else:
                shutil.rmtree(target, ignore_errors=True)
        best = max(candidates, key=lambda c: c.rank_key)  # first of equals: grid order
        if best.config is not None:
            assert best_dir is not None
            final = best_dir
        else:
            final = _ingredient_output(scratch / "ingredient", resolved[best.ingredient], refs, total)
        ranked = sorted(candidates, key=lambda c: c.rank_key, reverse=True)
        update_card(final, [(f"selected: {best.label}", best.score)] + [(c.label, c.score) for c in ranked],
                    task=task, dataset=dataset.name, metric=metric, model_name=out.absolute().name,
                    selected_from=total)
        publish(final, out, overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return TuneResult(path=out, best=best, candidates=ranked)


def _ingredient_output(target: Path, ingredient: Any, refs: list[str], candidates: int) -> Path:
    """When a single ingredient wins, the output is a copy of it, with a card and a marker saying so."""
    shutil.copytree(ingredient.path, target, ignore=shutil.ignore_patterns("README.md", "*.py", ".*"))
    selection_card(ingredient, refs, candidates).save(target / "README.md")
    # Marks the copy as ame-hf's own output (so `--overwrite` may replace it and `push` takes it);
    # it is no merge recipe, and `merge --config` says so.
    write_selection_file(target / RUN_FILE, ingredient, candidates)
    return target


def _say(log: Callable[[str], None] | None, cand: Candidate) -> None:
    if log:
        log(f"{cand.score:8.4f}  {cand.label}")
