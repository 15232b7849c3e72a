"""Candidates for selection and their ranking: a direction-aware score (the highest accuracy, the lowest loss), and
among equals the soup, then the greedy soup, then AME, then a single ingredient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .config import AmeConfig
from .errors import InvalidConfigError
from .evaluation import sort_key

__all__ = ["Candidate", "best_candidate", "ranked"]


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
