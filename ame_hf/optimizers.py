"""Registry of the `torch.optim` optimizers AME can drive, and validation of their arguments.

Only optimizers that update each element on its own are valid: AME then streams tensor by tensor.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import sys
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from .errors import InvalidConfigError, UnknownOptimizerError, UnsupportedOptimizerError

if TYPE_CHECKING:
    import torch

# name -> torch.optim class name. Every one of these updates each element independently,
# which is what makes tensor-by-tensor (and slice-by-slice) streaming exact.
OPTIMIZERS: dict[str, str] = {
    "adadelta": "Adadelta",
    "adagrad": "Adagrad",
    "adam": "Adam",
    "adamax": "Adamax",
    "adamw": "AdamW",
    "asgd": "ASGD",
    "nadam": "NAdam",
    "radam": "RAdam",
    "rmsprop": "RMSprop",
    "rprop": "Rprop",
    "sgd": "SGD",
}

# Plain gradient steps: `lr` already has the units of the weights, and SGD with lr 1 and the
# harmonic schedule is the uniform soup. The others normalise the step, so `lr` is a distance.
SGD_FAMILY = frozenset({"sgd", "asgd"})

# Refused with a reason: they need a closure or couple all parameters.
REFUSED: dict[str, str] = {
    "lbfgs": "LBFGS needs a loss closure and couples all parameters",
    "sparseadam": "SparseAdam only takes sparse gradients",
    "muon": "Muon orthogonalises whole matrices (not element-wise)",
    "adafactor": "Adafactor factorises second moments across rows and columns (not element-wise)",
}

# Arguments that never make sense for AME: we own the parameters, gradients and the closure.
_RESERVED = frozenset({"params", "lr", "self", "maximize", "differentiable", "capturable"})


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """Return the `torch.optim` class for a case-insensitive optimizer name.

    Raises:
        UnknownOptimizerError, UnsupportedOptimizerError: as `check_optimizer_name`.
    """
    import torch

    return getattr(torch.optim, OPTIMIZERS[check_optimizer_name(name)])


def new_optimizer(cls: type[torch.optim.Optimizer], params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """`cls(params, **kwargs)`, without the import of `torch._dynamo` it would otherwise trigger.

    torch.optim marks `add_param_group` (which `__init__` calls) as not to be compiled, and does so by
    importing `torch._dynamo` on its first call: 1.9 s here, as long as a whole 4 x 134M soup. Nothing in
    a merge is compiled, so while `torch._dynamo` is not loaded the mark is lent the plain function for
    the duration of the call, and taken back after it. Once `torch._dynamo` is loaded (the user compiles
    something), this is the plain call.
    """
    with _dynamo_mark_lent():
        return cls(params, **kwargs)


def take_step(optimizer: torch.optim.Optimizer) -> None:
    """`optimizer.step()`: the class's own update, the same arithmetic.

    `Optimizer.step` is wrapped by torch for profiling hooks and for torch.compile (a wrapper that
    imports `torch._dynamo` on every call, and turns gradients off). While `torch._dynamo` is not loaded
    and no step hook is registered, this calls the class's own `step` under `torch.no_grad()` (AME
    refuses `differentiable`), else the wrapped one.
    """
    import torch

    if "torch._dynamo" in sys.modules or _has_step_hooks(optimizer):
        optimizer.step()
        return
    with torch.no_grad():
        _own_step(type(optimizer))(optimizer)


@functools.lru_cache(maxsize=None)
def _own_step(cls: type) -> Any:
    return inspect.unwrap(cls.step)


def _has_step_hooks(optimizer: Any) -> bool:
    from torch.optim import optimizer as module

    hooks = (getattr(optimizer, "_optimizer_step_pre_hooks", None), getattr(optimizer, "_optimizer_step_post_hooks", None),
             getattr(module, "_global_optimizer_pre_hooks", None), getattr(module, "_global_optimizer_post_hooks", None))
    return any(hooks)


@contextlib.contextmanager
def _dynamo_mark_lent() -> Iterator[None]:
    from torch.optim import Optimizer

    own = inspect.unwrap(Optimizer.add_param_group)
    # torch's lazy `_disable_dynamo` wrapper uses `fn.__dynamo_disable` when set, else imports torch._dynamo.
    if "torch._dynamo" in sys.modules or own is Optimizer.add_param_group or hasattr(own, _MARK):
        yield
        return
    setattr(own, _MARK, own)
    try:
        yield
    finally:
        delattr(own, _MARK)


_MARK = "__dynamo_disable"


def check_optimizer_name(name: str) -> str:
    """The registry key of a case-insensitive optimizer name; needs no torch.

    Raises:
        UnsupportedOptimizerError: a `torch.optim` optimizer AME cannot drive (LBFGS, ...), with why.
        UnknownOptimizerError: no optimizer of that name; the message lists the valid names.
    """
    key = str(name).strip().lower()
    if key in REFUSED:
        raise UnsupportedOptimizerError(
            f"optimizer {name!r} cannot be used for AME: {REFUSED[key]}. "
            f"Choose one of: {', '.join(sorted(OPTIMIZERS))}", field="optimizer"
        )
    if key not in OPTIMIZERS:
        close = difflib.get_close_matches(key, sorted(OPTIMIZERS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UnknownOptimizerError(
            f"unknown optimizer {name!r}{hint}; choose one of: {', '.join(sorted(OPTIMIZERS))}", field="optimizer"
        )
    return key


def validate_optimizer_args(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Check keyword arguments against the optimizer's signature and by building it once.

    Returns the arguments as a plain dict (lists turned into tuples where torch wants tuples).

    Raises:
        InvalidConfigError: an unknown or invalid argument; the message lists the valid ones.
    """
    check_optimizer_name(name)
    if not args:
        return {}  # nothing to build: no torch import for a plain config
    if "lr" in args:
        raise InvalidConfigError("give the learning rate as lr (or relative_lr), not inside optimizer_args",
                                 fields=("optimizer_args", "lr", "relative_lr"))
    import torch

    cls = optimizer_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in _RESERVED]
    clean: dict[str, Any] = {}
    for key, value in dict(args).items():
        if key not in accepted:
            raise InvalidConfigError(f"optimizer_args: {cls.__name__} has no argument {key!r}; valid arguments: "
                                     f"{', '.join(accepted)}", field="optimizer_args")
        clean[key] = tuple(value) if isinstance(value, list) else value
    try:
        new_optimizer(cls, [torch.zeros(1)], lr=1e-3, **clean)
    except (TypeError, ValueError) as err:
        raise InvalidConfigError(f"invalid optimizer_args for {cls.__name__}: {err}", field="optimizer_args") from err
    return clean


def full_hyperparameters(name: str, args: Mapping[str, Any], lr: float) -> dict[str, Any]:
    """Every hyperparameter the optimizer really runs with (its defaults filled in), for the card."""
    import torch

    cls = optimizer_class(name)
    opt = new_optimizer(cls, [torch.zeros(1)], lr=lr, **dict(args))
    group = dict(opt.param_groups[0])
    group.pop("params")
    out = {}
    for key, value in group.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


# Arguments that choose an implementation (same values, other kernels), not the update: they say
# nothing about the merge, so the card and `resolved.hyperparameters` leave them out.
IMPLEMENTATION_SWITCHES = frozenset({"foreach", "fused", "capturable", "differentiable"})


def reported_hyperparameters(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters to report for a run: every one the optimizer runs with, less the learning
    rate (reported on its own: it may be relative and per tensor) and implementation switches."""
    params = full_hyperparameters(name, args, 1e-3)
    params.pop("lr", None)
    return {k: v for k, v in params.items() if k not in IMPLEMENTATION_SWITCHES}
