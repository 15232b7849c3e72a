"""`tune`'s selection rule, robust to validation noise: each candidate's validation lead over the soup is measured
example by example (the per-example scores `evaluation.evaluate_examples` returns), and a candidate is picked
only when that lead is beyond the noise of the validation data; otherwise the soup is kept.

The rule (`selection="guarded"`, the default): for every candidate, `d_i` is its score minus the soup's on
validation example `i` (for a loss, the summed NLL of document `i`, with `n_i` predicted tokens; for accuracy,
right/wrong with `n_i = 1`), signed so that positive is better. Its lead is `L = sum(d) / sum(n)` (exactly the
difference of the two validation scores) and its standard error the ratio estimator's
`SE = sqrt(m / (m - 1) * sum((d_i - L * n_i) ** 2)) / sum(n)` over the `m` examples. The pick is the candidate
with the largest lower bound `L - Z * SE` (`Z = 1.645`, a one-sided 95 % bound), provided that bound is above 0;
the soup (bound 0) otherwise. Nothing is random: the same scores give the same pick. `selection="best"` is the
plain best validation score. lm-eval tasks give their per-document values (`_lm_eval_examples`: `n_i` is a
document's weight, so that `L` is exactly the difference of the two weighted task scores) where the metric is a mean
over documents. Metrics that are no mean over examples (`macro_f1`, an lm-eval `f1`, `bleu`, a perplexity) give no
per-example scores: the guard cannot apply and the best validation score is kept (the card says so, and for lm-eval
names the task and the metric).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .errors import InvalidConfigError
from .evaluation import PerExample, higher_is_better
from .ranking import Candidate, best_candidate

SELECTIONS = ("guarded", "best")
DEFAULT_SELECTION = "guarded"
Z = 1.645  # one-sided 95 % normal bound on a paired lead


def check_selection(selection: str) -> str:
    """`selection` if it is one of `SELECTIONS`.

    Raises:
        InvalidConfigError: any other value.

    >>> check_selection("best")
    'best'
    """
    if selection not in SELECTIONS:
        raise InvalidConfigError(f"selection={selection!r} is not one of: {', '.join(SELECTIONS)} (guarded: keep a "
                                 "candidate only when it beats the soup beyond validation noise)", field="selection")
    return selection


@dataclass(frozen=True)
class Lead:
    """A candidate's validation lead over the soup (positive: better, in the metric's units: a fraction for accuracy,
    nats for a loss), its standard error and the lower bound `lead - Z * se`."""

    lead: float
    se: float

    @property
    def bound(self) -> float:
        return self.lead - Z * self.se


def paired_lead(candidate: PerExample, soup: PerExample, higher: bool) -> Lead | None:
    """The lead of `candidate` over `soup` on the same examples, with its standard error (see the module's doc).

    Returns:
        None when the two were not scored on the same examples (other lengths or token counts), or on fewer than 2.

    >>> paired_lead(([1.0, 1.0, 1.0, 0.0], [1.0] * 4), ([1.0, 0.0, 1.0, 0.0], [1.0] * 4), True)
    Lead(lead=0.25, se=0.25)
    """
    (num, den), (base, base_den) = candidate, soup
    if len(num) != len(base) or len(num) < 2 or list(den) != list(base_den) or sum(den) <= 0:
        return None
    sign = 1.0 if higher else -1.0
    d = [sign * (a - b) for a, b in zip(num, base)]
    total = math.fsum(den)
    lead = math.fsum(d) / total
    spread = math.fsum((x - lead * n) ** 2 for x, n in zip(d, den))
    return Lead(lead, math.sqrt(len(d) / (len(d) - 1) * spread) / total)


def is_soup(cand: Candidate) -> bool:
    return cand.config is not None and cand.kept is None and cand.config.is_soup


@dataclass
class Examples:
    """The per-example validation scores of one `tune`'s candidates, and its selection rule.

    `scorer` wraps the evaluation: every validation score it makes is recorded (by model folder); `attach` gives a
    candidate the scores of the model it was scored as; `choose` applies the rule to the candidates so far.
    """

    selection: str
    metric: str = "accuracy"  # set by `scorer`
    # (model, its per-example scores, or None, or why there are none: a line from `_lm_eval_examples`)
    calls: list[tuple[Any, PerExample | str | None]] = field(default_factory=list)
    of: dict[int, PerExample | str | None] = field(default_factory=dict)  # id(candidate) -> as in `calls`

    def scorer(self, evaluate: Callable[[Any, Any, list[PerExample]], float], val: Any,
               metric: str) -> Callable[..., float]:
        """A `score(model, data=val)` for `tune`: `evaluate(model, data, per_example)`'s score (a folder passed as a
        string, a model built in memory as it is), recording the per-example scores it gives on `val`, of `metric`
        (an `evaluate` that adds none, as for `macro_f1`, leaves the candidate without: the guard cannot apply)."""
        self.metric = metric

        def score(model: Any, data: Any = val) -> float:
            each: list[PerExample] = []
            value = evaluate(os.fspath(model) if isinstance(model, os.PathLike) else model, data, each)
            if data is val:
                self.calls.append((_key(model), each[0] if each else None))
            return value
        return score

    def attach(self, cand: Candidate, folder: os.PathLike | None) -> None:
        """Record `cand`'s per-example scores: an ingredient's are the i-th scored (tune scores them first), a
        candidate with a `folder` those of the latest model scored there, any other those of the latest model."""
        if cand.ingredient is not None:
            self.of[id(cand)] = self.calls[cand.ingredient][1]
            return
        key = _key(folder) if folder is not None else None
        found = [each for k, each in self.calls if key is None or k == key]
        self.of[id(cand)] = found[-1] if found else None

    def choose(self, candidates: Sequence[Candidate]) -> tuple[Candidate, str]:
        """The pick among `candidates` and why, in Markdown (see the module's doc for the rule)."""
        best = best_candidate(candidates, self.metric)
        if self.selection == "best":
            return best, "The best validation score (`selection=best`)."
        soup = next((c for c in candidates if is_soup(c)), None)
        base = self.of.get(id(soup)) if soup is not None else None
        if base is None or isinstance(base, str):
            why = (f"The best validation score: {base if base else f'{self.metric} gives no per-example scores'}, "
                   "so the guard against validation noise cannot apply.") if soup is not None else (
                "The best validation score so far.")
            return best, why
        leads = {id(c): paired_lead(self.of[id(c)], base, higher_is_better(self.metric))
                 for c in candidates if c is not soup and self.of.get(id(c)) is not None
                 and not isinstance(self.of[id(c)], str)}
        # The largest lower bound; among equals the better validation score, then the candidates' own order.
        rank = {id(c): i for i, c in enumerate(_ranked(candidates, self.metric))}
        pick = max((c for c in candidates if leads.get(id(c)) is not None),
                   key=lambda c: (leads[id(c)].bound, -rank[id(c)]), default=None)
        if pick is None or leads[id(pick)].bound <= 0:
            lead = leads.get(id(best))
            return soup, ("The soup: no candidate beats it on validation beyond noise (a one-sided 95 % bound on "
                          "its lead, example by example, is not above 0)" + (
                              f"; the best validation score, {best.label}, leads by {_units(lead.lead, self.metric)}"
                              f" ± {_units(lead.se, self.metric)} (standard error)" if lead is not None else "")
                          + ". `selection=best` would take the best validation score.")
        lead = leads[id(pick)]
        return pick, (f"{pick.label}: its validation lead over the soup, {_units(lead.lead, self.metric)} ± "
                      f"{_units(lead.se, self.metric)} (standard error, paired over the examples), has the largest "
                      f"one-sided 95 % lower bound ({_units(lead.bound, self.metric)}, above 0) of all candidates."
                      + ("" if pick is best else f" The best validation score, {best.label}, has a lead less sure "
                         "to hold on new data.") + " `selection=best` would take the best validation score.")


def _ranked(candidates: Sequence[Candidate], metric: str) -> list[Candidate]:
    from .ranking import ranked

    return ranked(candidates, metric)


def _units(x: float, metric: str) -> str:
    if metric == "accuracy":
        return f"{100 * x:.2f} points"
    return f"{x:.4f}" + (" nats per token" if metric in ("loss", "perplexity") else "")


def _key(model: Any) -> Any:
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else id(model)
