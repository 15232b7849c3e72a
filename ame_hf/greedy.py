"""The greedy soup (Wortsman et al. 2022, *Model soups*, Recipe 1): the walk that adds ingredients, best first,
to a running uniform soup while its validation score does not get worse, and the card section that tells it."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .config import WEIGHT_FIELDS, AmeConfig
from .errors import InvalidConfigError
from .evaluation import is_better, sort_key
from .merging import merge

__all__ = ["GreedySoup", "greedy_label", "greedy_section", "run_greedy_soup", "soup_config"]


@dataclass(kw_only=True)
class GreedySoup:
    """The trace of a greedy soup: which ingredients it kept, each step, and where its merge is.

    Attributes:
        kept: the ingredient indices averaged, in the user's order.
        score: the validation score of the kept soup (of the single best ingredient when only it is kept).
        steps: `(ingredient, validation score of the soup with it, kept?)` in the order tried; the
            first step is the best ingredient alone.
        path: the merge of the kept ingredients (None when only one ingredient is kept).
    """

    kept: list[int]
    score: float
    steps: list[tuple[int, float, bool]] = field(default_factory=list)
    path: Path | None = None


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
                                 f"{', '.join('--' + f.replace('_', '-') for f in changed)}")
    return AmeConfig.soup(**{f.name: getattr(config, f.name) for f in dataclasses.fields(AmeConfig)
                             if f.name not in WEIGHT_FIELDS})


def run_greedy_soup(refs: Sequence[str], scores: Sequence[float], score: Callable[[Path], float], metric: str,
                    scratch: Path, name: str, *, config: AmeConfig | None = None, token: str | None = None,
                    log: Callable[[str], None] | None = None) -> GreedySoup:
    """The greedy soup: ingredients sorted by validation score (best first); each is added to the running
    uniform soup only if the soup's validation score does not get worse (Wortsman et al. 2022, Recipe 1).

    Args:
        refs: the ingredients (pinned references or local paths).
        scores: each ingredient's validation score (evaluated once, by the caller).
        score: the validation score of a merged model folder.
        metric: the metric of the scores (its direction decides "worse").
        scratch: a folder for the trial merges; only the kept soup stays there.
        name: the folder name of each merge (the card's "How to use" names it).
        config: output options for the merges (see `soup_config`).

    Returns:
        A `GreedySoup`.

    Raises:
        InvalidConfigError: `config` sets an option that decides the weights.
    """
    cfg = soup_config(config)
    order = sorted(range(len(refs)), key=lambda i: -sort_key(scores[i], metric))  # stable: ties by index
    kept, best = [order[0]], scores[order[0]]
    trace = GreedySoup(kept=kept, score=best, steps=[(order[0], best, True)])
    for n, i in enumerate(order[1:]):
        trial = sorted(kept + [i])
        target = scratch / f"greedy{n}" / name
        target.parent.mkdir(parents=True)
        merge([refs[k] for k in trial], target, cfg, token=token, progress=False)
        value = score(target)
        keep = not is_better(best, value, metric)  # "does not get worse": equal is kept
        trace.steps.append((i, value, keep))
        if log:
            log(f"{value:8.4f}  greedy soup + ingredient {i}: {'kept' if keep else 'rejected'}")
        if keep:
            if trace.path is not None:
                shutil.rmtree(trace.path.parent, ignore_errors=True)
            kept, best, trace.path = trial, value, target
        else:
            shutil.rmtree(target.parent, ignore_errors=True)
    trace.kept, trace.score = kept, best
    return trace


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
