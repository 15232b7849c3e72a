"""The candidates `tune` tries besides the soups and the ingredients: the AME grid (`default_grid`), the merges
from a known base (`base_grid`), each candidate's label, and the list with the run's output options."""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from .config import OUTPUT_FIELDS, AmeConfig


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


def candidate_label(cfg: AmeConfig) -> str:
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


def candidate_configs(grid: Sequence[AmeConfig], budget: int, output: AmeConfig) -> list[AmeConfig]:
    """The soup, then the first `budget` of `grid`, each with the output options `output` sets."""
    default = AmeConfig()
    given = {f: getattr(output, f) for f in OUTPUT_FIELDS if getattr(output, f) != getattr(default, f)}
    return [dataclasses.replace(cfg, **given) for cfg in [AmeConfig.soup(), *list(grid)[:budget]]]
