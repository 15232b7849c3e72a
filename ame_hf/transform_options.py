"""The options of the task-vector transforms (TIES, DARE, breadcrumbs) and of ingredient weights, checked without
torch: `AmeConfig` calls `check_transform`, and `check_ingredient_lists` once the ingredients are counted."""

from __future__ import annotations

import math
from typing import Any

from .errors import InvalidConfigError
from .weights import check_weights, parse_weights

# transform -> (how each task vector is sparsified, whether signs are elected). The names are mergekit's.
TRANSFORMS = ("none", "ties", "dare", "dare_ties", "breadcrumbs", "breadcrumbs_ties")
SPARSIFY = {"none": None, "ties": "magnitude", "dare": "random", "dare_ties": "random", "breadcrumbs": "outliers",
            "breadcrumbs_ties": "outliers"}
ELECTS = frozenset({"ties", "dare_ties", "breadcrumbs_ties"})
RESCALES = ("none", "density", "l1")


def _fractions(name: str, value: Any, *, low_open: bool, high: float) -> float | list[float]:
    """One number, or one per ingredient (a list, or the text `0.5,0.3`), each in (0, high] or [0, high)."""
    items = value
    if isinstance(value, str):
        items = [p.strip() for p in value.strip().strip("[]").split(",")]
    many = isinstance(items, (list, tuple))
    out = []
    for item in items if many else [items]:
        try:
            number = float(item) if not isinstance(item, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        ok = (0 < number <= high) if low_open else (0 <= number < high)
        if not ok:
            span = f"(0, {high:g}]" if low_open else f"[0, {high:g})"
            raise InvalidConfigError(f"{name} {item!r} must be a number in {span}, or one per ingredient",
                                     field=name)
        out.append(number)
    if not out:
        raise InvalidConfigError(f"{name} must not be empty", field=name)
    return out if many and len(out) > 1 else out[0]


def check_transform(config: Any) -> dict[str, Any]:
    """The normalized values of the weight and transform fields of an `AmeConfig` being built.

    Raises:
        InvalidConfigError: an invalid value; a transform option without a transform; a transform whose task
            vectors would be taken from the mean (it needs a base: `pivot=base`, a checkpoint or an index).
    """
    transform = str(config.transform).strip().lower()
    if transform not in TRANSFORMS:
        raise InvalidConfigError(f"unknown transform {config.transform!r}; choose one of: {', '.join(TRANSFORMS)}",
                                 field="transform")
    out: dict[str, Any] = {"transform": transform, "weights": parse_weights(config.weights),
                           "density": _fractions("density", config.density, low_open=True, high=1.0),
                           "gamma": _fractions("gamma", config.gamma, low_open=False, high=1.0)}
    rescale = config.rescale
    if rescale is not None and str(rescale).lower() not in RESCALES:
        raise InvalidConfigError(f"unknown rescale {rescale!r}; choose one of: {', '.join(RESCALES)}", field="rescale")
    out["rescale"] = None if rescale is None else str(rescale).lower()
    if not isinstance(config.disjoint_sum, bool):
        raise InvalidConfigError(f"disjoint_sum must be true or false, got {config.disjoint_sum!r}",
                                 field="disjoint_sum")
    if transform == "none":
        given = [k for k, default in (("density", 1.0), ("gamma", 0.01)) if out[k] != default]
        given += ["rescale"] * (out["rescale"] is not None) + ["disjoint_sum"] * config.disjoint_sum
        if given:
            raise InvalidConfigError(f"{', '.join(given)} only apply with a transform (ties, dare, ...); add "
                                     "transform= or drop them", fields=given)
    elif config.pivot == "mean":
        raise InvalidConfigError(f"transform {transform} works on task vectors (ingredient - base): give the base as "
                                 "pivot (pivot=base for adapters, or the base checkpoint's reference)",
                                 fields=("transform", "pivot"))
    if config.disjoint_sum and transform not in ELECTS:
        raise InvalidConfigError(f"disjoint_sum applies to the sign-electing transforms ({', '.join(sorted(ELECTS))}), "
                                 f"not {transform}", field="disjoint_sum")
    return out


def rescale_of(config: Any) -> str:
    """The rescale in effect: the given one, else `density` for DARE (1/density, the paper's) and `none`."""
    if config.rescale is not None:
        return config.rescale
    return "density" if SPARSIFY[config.transform] == "random" else "none"


def per_ingredient(value: float | list[float], i: int) -> float:
    """Ingredient `i`'s value of a per-ingredient option (one number for all, or a list)."""
    return value[i] if isinstance(value, list) else value


def check_ingredient_lists(config: Any, n: int) -> None:
    """Per-ingredient options against the number of ingredients: one weight (and density, gamma) each.

    Raises:
        InvalidConfigError: a list of another length, or non-positive weights with the harmonic schedule.
    """
    schedule = config.schedule or ("harmonic" if config.optimizer in ("sgd", "asgd") else "constant")
    check_weights(config.weights, n, schedule)
    for name in ("density", "gamma"):
        value = getattr(config, name)
        if isinstance(value, list) and len(value) != n:
            raise InvalidConfigError(f"{len(value)} values of {name} for {n} ingredients; give one number, or one "
                                     "per ingredient", field=name)
