"""Ingredient weights (`--weights 0.5,0.3,0.2`): how they are read, and the one rule by which they enter AME.

The rule (README "Ingredient weights"): weights are scaled to mean 1 (`relative_weights`); a batch's target is
the weighted mean of its ingredients, and the step's learning rate is multiplied by the batch's weight share:
`lr * mean weight of the batch` (constant schedule) or `lr * batch weight / weight seen this epoch` (harmonic).
So SGD, lr 1, harmonic is the weighted running mean (the weighted soup), and equal weights are no weights at
all (the same bytes). A `mean` pivot is the weighted mean. Imports torch only inside the tensor functions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import InvalidConfigError

if TYPE_CHECKING:
    import torch


def parse_weights(value: Any) -> list[float] | None:
    """Ingredient weights from a list of numbers or the text `0.5,0.3,0.2`; None (or empty) for none.

    Raises:
        InvalidConfigError: a weight that is no finite number, or weights whose sum is not positive.

    >>> parse_weights("0.5, 0.3,0.2"), parse_weights(None)
    ([0.5, 0.3, 0.2], None)
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().strip("[]")
        if not text:
            return None
        value = [p.strip() for p in text.split(",")]
    if isinstance(value, (int, float)) or not isinstance(value, (list, tuple)):
        raise InvalidConfigError(f"weights must be one number per ingredient, e.g. 0.5,0.3,0.2; got {value!r}",
                                 field="weights")
    out = []
    for item in value:
        try:
            number = float(item) if not isinstance(item, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise InvalidConfigError(f"weight {item!r} is not a finite number; give one number per ingredient, "
                                     "e.g. 0.5,0.3,0.2", field="weights")
        out.append(number)
    if not out:
        return None
    if not sum(out) > 0:
        raise InvalidConfigError(f"the weights sum to {sum(out):g}; their sum must be positive", field="weights")
    return out


def weighted_entries(items: Any, source: str) -> tuple[Any, list[float] | None]:
    """A YAML recipe's `ingredients:` list, whose entries may be `{model: REF, weight: W}` (`weight:` in YAML): the
    references, and the weights (None when no entry has one; an entry without one weighs 1).

    Raises:
        InvalidConfigError: an entry mapping without `model`, or with other keys.

    >>> weighted_entries(["a", {"model": "b", "weight": 3}], "x.yaml")
    (['a', 'b'], [1.0, 3.0])
    """
    if not isinstance(items, list) or not any(isinstance(item, dict) for item in items):
        return items, None
    refs, weights = [], []
    for item in items:
        if isinstance(item, dict):
            if "model" not in item or set(item) - {"model", "weight"}:
                raise InvalidConfigError(f"{source}: an ingredients entry is a reference or {{model: REF, weight: W}}, "
                                         f"got {item!r}", field="weights")
            refs.append(item["model"])
            weights.append(item.get("weight", 1.0))
        else:
            refs.append(item)
            weights.append(1.0)
    return refs, parse_weights(weights)


def check_weights(weights: Sequence[float] | None, n: int, schedule: str) -> None:
    """What weights ask of a run of `n` ingredients with `schedule` (known once both are).

    Raises:
        InvalidConfigError: not one weight per ingredient, or a weight <= 0 with the harmonic schedule.
    """
    if weights is None:
        return
    if len(weights) != n:
        raise InvalidConfigError(f"{len(weights)} weights for {n} ingredients; give one weight per ingredient",
                                 field="weights")
    if schedule == "harmonic" and min(weights) <= 0:
        raise InvalidConfigError("the harmonic schedule (the weighted soup) needs every weight > 0; use "
                                 "schedule=constant for zero or negative weights", fields=("weights", "schedule"))


def relative_weights(weights: Sequence[float] | None) -> list[float] | None:
    """The weights scaled to mean 1 (`w_i * n / sum w`); None when none are given or all are equal, so that
    equal weights run exactly the unweighted arithmetic.

    >>> relative_weights([1, 1, 2]), relative_weights([0.2, 0.2])
    ([0.75, 0.75, 1.5], None)
    """
    if weights is None or len(set(weights)) <= 1:
        return None
    total = math.fsum(weights)
    return [w * len(weights) / total for w in weights]


def weighted_batch_mean(load: Callable[[int], "torch.Tensor"], batch: Sequence[int],
                        weights: Sequence[float]) -> "torch.Tensor":
    """`x_0 + sum_i w_i (x_i - x_0) / sum_i w_i` over `batch`, loading one at a time (what `load` returns is
    not modified). Where the ingredients agree every difference is zero: the mean is exactly their value.
    A batch of total weight 0 gives its first ingredient (its step's learning rate is 0).
    """
    import torch

    first = load(batch[0])
    total = torch.zeros_like(first)
    diff = torch.empty_like(first)
    for i in batch[1:]:
        total.add_(torch.sub(load(i), first, out=diff), alpha=weights[i])
    weight = math.fsum(weights[i] for i in batch)
    if weight != 0:
        total /= weight
    total += first
    return total


def weighted_mean(load: Callable[[int], "torch.Tensor"], n: int, weights: Sequence[float],
                  dtype: "torch.dtype") -> "torch.Tensor":
    """The weighted mean of all `n` ingredients (a `mean` pivot), in float64, as `x_0 + sum w_i (x_i - x_0) /
    sum w_i` (exactly their value where they agree), returned in `dtype`."""
    import torch

    first = load(0).to(torch.float64, copy=True)
    total = torch.zeros_like(first)
    for i in range(1, n):
        total.add_(load(i).double() - first, alpha=weights[i])
    return total.div_(math.fsum(weights)).add_(first).to(dtype)
