"""The AME engine: the real `torch.optim` optimizer driven by pseudogradients (DESIGN §1).

Works on one tensor (or one slice of rows of it) at a time; knows nothing about files or the Hub.
"""

from __future__ import annotations

import functools
import random
from typing import Callable, Sequence

import torch

from .config import AmeConfig, order_indices
from .optimizers import new_optimizer, optimizer_class, take_step
from .weights import relative_weights, weighted_batch_mean

Loader = Callable[[int], torch.Tensor]


def ingredient_order(n: int, epochs: int, *, shuffle: bool = False, seed: int = 0,
                     order: str | Sequence[int] = "given") -> list[list[int]]:
    """The order of ingredient indices in each epoch: `order` (given, reverse or a permutation), and with
    `shuffle` that order permuted per epoch from `seed`.

    The shuffle permutes the *positions* of `order` with a permutation that depends only on (seed, epoch),
    so `given` + shuffle is today's shuffle, and any combination is reproducible and recorded.

    Args:
        n: the number of ingredients.
        epochs: how many passes over them.
        shuffle: permute the order in each epoch.
        seed: the seed of the shuffle.
        order: `given`, `reverse`, or a permutation of `0..n-1` (a list or `"2,0,1"`).

    Returns:
        One list of ingredient indices per epoch.

    Raises:
        InvalidConfigError: `order` is no permutation of the `n` ingredients.

    >>> ingredient_order(3, 2)
    [[0, 1, 2], [0, 1, 2]]
    >>> ingredient_order(3, 1, order="reverse")
    [[2, 1, 0]]
    """
    base = order_indices(order if isinstance(order, str) else list(order), n)
    orders = []
    for epoch in range(1, epochs + 1):
        order_ = list(base)
        if shuffle:
            random.Random(f"ame-hf:{seed}:{epoch}").shuffle(order_)
        orders.append(order_)
    return orders


def batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive chunks of `batch_size` ingredients (the last one may be smaller).

    Args:
        order: ingredient indices, in the order they are visited.
        batch_size: ingredients per step.

    Returns:
        The batches, in order.

    >>> batches([2, 0, 1], 2)
    [[2, 0], [1]]
    """
    return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


def step_lrs(order: Sequence[Sequence[int]], batch_size: int, lr: float, schedule: str,
             weights: Sequence[float] | None = None) -> list[float]:
    """The learning rate of every step.

    `constant`: lr. `harmonic`: lr * |batch| / ingredients seen so far this epoch, so that SGD with
    lr 1 is the running mean of the ingredients, i.e. exactly the uniform soup after each epoch.
    With ingredient `weights` (`weights.relative_weights`: mean 1) a batch counts as its weight, not its
    size: `constant` is lr * mean weight of the batch, `harmonic` lr * batch weight / weight seen this epoch
    (SGD, lr 1 is then the weighted running mean: the weighted soup).

    Args:
        order: the ingredient indices of each epoch (`ingredient_order`).
        batch_size: ingredients per step.
        lr: the base learning rate.
        schedule: `constant` or `harmonic`.

    Returns:
        One learning rate per step, in the order the steps are taken.

    >>> step_lrs([[0, 1, 2]], 1, 1.0, "harmonic")
    [1.0, 0.5, 0.3333333333333333]
    """
    lrs = []
    for epoch_order in order:
        seen = 0
        for batch in batches(epoch_order, batch_size):
            if weights is not None:
                weight = sum(weights[i] for i in batch)
                seen += weight
                lrs.append(lr * (weight / len(batch) if schedule == "constant" else weight / seen))
                continue
            seen += len(batch)
            lrs.append(lr if schedule == "constant" else lr * len(batch) / seen)
    return lrs


def pseudogradient(w: torch.Tensor, target: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The AME pseudogradient: from the current weights towards (the mean of) the ingredients.

    Args:
        w: the current weights.
        target: an ingredient, or the mean of a batch of them.
        out: a buffer of `w`'s shape to write it into (no allocation), or None.

    Returns:
        `w - target` (`out` when given).

    >>> pseudogradient(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0]))
    tensor([0.5000, 0.0000])
    """
    return torch.sub(w, target, out=out) if out is not None else w - target


def batch_mean(load: Loader, batch: Sequence[int], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Mean of the ingredients in `batch` as `x_0 + mean(x_i - x_0)`, loading one at a time; what `load` returns
    is not modified (one ingredient: it is the mean).

    Where the ingredients agree every difference is exactly zero, so the mean is exactly their value and the
    pseudogradient there exactly zero, for every optimizer (a plain float sum of equal values, divided, is not
    always that value: Adam turned the residue into an lr-sized step).

    With `weights` it is the weighted mean `x_0 + sum w_i (x_i - x_0) / sum w_i`: exact where they agree too.

    Args:
        load: `load(i)` gives ingredient `i`'s values (never modified here).
        batch: the ingredient indices to average.
        weights: every ingredient's weight (indexed by ingredient), or None for the plain mean.

    Returns:
        Their mean: a tensor of its own, or `load(i)` itself for a batch of one.

    >>> values = [torch.tensor([1.0, 3.0]), torch.tensor([1.0, 5.0])]
    >>> batch_mean(values.__getitem__, [0, 1])
    tensor([1., 4.])
    """
    if len(batch) == 1:
        return load(batch[0])
    if weights is not None:
        return weighted_batch_mean(load, batch, weights)
    first = load(batch[0])
    total = load(batch[1]) - first  # a tensor of our own
    for i in batch[2:]:
        total.add_(load(i)).sub_(first)  # where x_i == x_0 the running sum stays exactly 0
    total /= len(batch)
    total += first
    return total


def ame_block(
    load: Loader,
    pivot: torch.Tensor,
    config: AmeConfig,
    order: Sequence[Sequence[int]],
    lr: float,
    *,
    own_pivot: bool = False,
) -> torch.Tensor:
    """Run AME on one tensor (or slice) and return the merged values in the pivot's dtype.

    Args:
        load: `load(i)` returns ingredient `i`'s values for this block in the compute dtype; the engine
            never modifies it (a loader may hand out the same kept tensor to several passes).
        pivot: the starting point, in the compute dtype.
        config: a resolved `AmeConfig` (optimizer, its arguments, schedule, batch size).
        order: the ingredient indices of each epoch (from `ingredient_order`).
        lr: the base learning rate of this tensor (absolute, or relative_lr * RMS spread).
        own_pivot: the caller hands `pivot` over (a fresh tensor it does not use again): it becomes the
            weights in place, without a copy. Otherwise it is not modified.

    Returns:
        The merged values of the block.

    >>> values = [torch.tensor([0.0, 2.0]), torch.tensor([2.0, 2.0])]
    >>> soup = AmeConfig.soup().resolved()
    >>> ame_block(values.__getitem__, torch.zeros(2), soup, ingredient_order(2, 1), lr=1.0)
    tensor([1., 2.])
    """
    w = pivot if own_pivot else pivot.clone()
    if w.numel() == 0:
        return w
    optimizer = new_optimizer(optimizer_class(config.optimizer), [w], lr=lr, **device_defaults(config, w.device),
                              **dict(config.optimizer_args))
    group = optimizer.param_groups[0]
    weights = relative_weights(config.weights)
    lrs = iter(step_lrs(order, config.batch_size, lr, config.schedule or "constant", weights))
    grad = torch.empty_like(w)  # one buffer for every step: no allocation per ingredient
    for epoch_order in order:
        for batch in batches(epoch_order, config.batch_size):
            w.grad = pseudogradient(w, batch_mean(load, batch, weights), out=grad)
            group["lr"] = next(lrs)
            take_step(optimizer)
    w.grad = None
    return w


def decay_arguments(optimizer: str, args: dict) -> dict[str, float]:
    """The decay terms in effect for `optimizer` with `args` (torch's defaults filled in): they shrink every
    weight at every step whatever its pseudogradient, also where all ingredients agree (AdamW's
    `weight_decay` is 0.01 and ASGD's `lambd` 1e-4 by default).

    Args:
        optimizer: the optimizer's name (`adamw`, `asgd`, ...).
        args: its `optimizer_args`.

    Returns:
        The non-zero decay arguments by name (empty: no decay).

    >>> decay_arguments("adamw", {}), decay_arguments("adam", {"weight_decay": 0.1})
    ({'weight_decay': 0.01}, {'weight_decay': 0.1})
    """
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(optimizer_class(optimizer).__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    values = {**defaults, **dict(args)}
    return {k: values[k] for k in ("weight_decay", "lambd") if isinstance(values.get(k), (int, float))
            and not isinstance(values.get(k), bool) and values[k] != 0}


# Optimizers whose fused kernel (one pass per step, on CPU and CUDA) torch provides.
FUSED = ("Adam", "AdamW", "SGD", "Adagrad")


def device_defaults(config: AmeConfig, device: torch.device) -> dict[str, bool]:
    """torch's fused kernel where the optimizer has one for this device, unless the user chose
    `fused`/`foreach`: one pass per step instead of several (Adam on CPU: 1.3 vs 6.9 ms per
    million weights). Element-wise like the plain implementation, so streaming stays exact.

    Args:
        config: the resolved `AmeConfig` (its optimizer and `optimizer_args`).
        device: where the block is merged.

    Returns:
        Extra keyword arguments of the optimizer: `{"fused": True}` or none.
    """
    if {"fused", "foreach"} & set(config.optimizer_args) or device.type not in ("cpu", "cuda"):
        return {}
    cls = optimizer_class(config.optimizer)
    return {"fused": True} if cls.__name__ in FUSED and _fused_supported(cls, device.type) else {}


@functools.lru_cache(maxsize=None)
def _fused_supported(cls: type, device_type: str) -> bool:
    # Some refuse only at the first step (Adagrad's fused kernel is CPU-only), so take one.
    try:
        p = torch.zeros(1, device=device_type, requires_grad=True)
        p.grad = torch.ones_like(p)
        take_step(new_optimizer(cls, [p], lr=1e-3, fused=True))
    except (RuntimeError, ValueError, TypeError):
        return False
    return True
