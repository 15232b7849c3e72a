"""`AmeConfig`: the validated, frozen description of one AME run, and its YAML form.

The same object drives the CLI, the Python API, `ame_config.yaml` and the model card. Imports no torch
(except to build an optimizer once when `optimizer_args` are given): option errors are instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import _yaml_mapping
from ._validators import choice, flag, parse_size, positive_number, whole_number
from .errors import InvalidConfigError
from .optimizers import OPTIMIZERS
from .transform_options import RESCALES, TRANSFORMS, check_transform

# Adaptive optimizers (Adam and friends) move each weight by about `lr` per step, whatever the
# distance to the ingredients, so the default learning rate is relative: `DEFAULT_RELATIVE_LR`
# times the per-tensor RMS of (ingredient - pivot). See README "Defaults" for the measurements.
DEFAULT_OPTIMIZER = "adam"
DEFAULT_RELATIVE_LR = 0.005
DEFAULT_PIVOT = "mean"
DEFAULT_ORDER = "given"
ORDERS = ("given", "reverse")
DEFAULT_TOKENIZER_SOURCE = "auto"
# Tokenizer-source keywords (anything else that is no index is a checkpoint reference).
SOURCE_WORDS = ("auto", "union", "pivot", "first")
# Pivot keywords (anything else that is no index is a checkpoint reference).
PIVOT_WORDS = ("mean", "first", "base")
DEFAULT_MAX_SHARD_SIZE = "5GB"
# What a merge writes: a full model, or a PEFT LoRA adapter of the base (`adapter_out`).
SAVE_AS = ("model", "adapter")

# The fields that choose the AME steps themselves: a soup fixes them, `tune` tries its own. The others
# (`OUTPUT_FIELDS`) say which files are read (base, variant, tokenizer_source) and how the output is written.
WEIGHT_FIELDS = ("optimizer", "lr", "relative_lr", "optimizer_args", "schedule", "epochs", "batch_size", "pivot",
                 "order", "shuffle", "seed", "weights", "transform", "density", "gamma", "rescale", "disjoint_sum")
# The fields that change what `check` reads or reports.
CHECK_FIELDS = ("dtype", "pivot", "base", "variant", "tokenizer_source")

SCHEDULES = ("constant", "harmonic")
# The last two: the quantized ingredients' own format (FP8, MXFP4), quantized again when the merge is written.
QUANTIZED_OUTPUT_DTYPES = ("float8_e4m3fn", "mxfp4")
OUTPUT_DTYPES = ("auto", "float32", "bfloat16", "float16", *QUANTIZED_OUTPUT_DTYPES)
COMPUTE_DTYPES = ("float32", "float64")

# Keys written for humans (and reproduction checks) that are ignored when read back.
INFO_KEYS = ("ame_hf_version", "resolved")


def _option(default: Any, cli: str | tuple[str, ...], help: str) -> Any:
    """A field of `AmeConfig` with its command-line form (the CLI builds `merge`'s options from these)."""
    if callable(default):
        return field(default_factory=default, metadata={"cli": cli, "help": help})
    return field(default=default, metadata={"cli": cli, "help": help})


@dataclass(frozen=True, kw_only=True)
class AmeConfig:
    """The hyperparameters of one AME run (DESIGN §1). Validated on construction; compare with ==.

    Args:
        optimizer: a `torch.optim` optimizer by name, case-insensitive (`adam`, `sgd`, `adagrad`, ...).
        lr: the plain `torch.optim` learning rate. Exclusive with `relative_lr`.
        relative_lr: learning rate as a multiple of each tensor's RMS of (ingredient - pivot).
            When neither is given: `relative_lr=0.005` for adaptive optimizers, `lr=1` for SGD/ASGD.
        optimizer_args: other keyword arguments of the optimizer (`{"betas": [0.9, 0.99]}`).
        schedule: `constant` (lr every step) or `harmonic` (lr * batch / ingredients seen this
            epoch). Default: harmonic for SGD/ASGD (SGD, lr 1 is then the uniform soup), else constant.
        epochs: ensembling epochs (passes over all ingredients).
        batch_size: ingredients averaged into one pseudogradient.
        pivot: `mean`, `first`, an ingredient index, or a reference to another checkpoint.
        order: the ingredient order of every epoch: `given`, `reverse`, or a permutation of the
            ingredient indices (`[2, 0, 1]`, or the text `"2,0,1"`).
        shuffle: shuffle the ingredient order every epoch from `seed` (a permutation of `order`).
        seed: the seed of the shuffle and of DARE's drop mask.
        weights: one weight per ingredient (README "Ingredient weights"), or None.
        transform: `none`, `ties`, `dare`, `dare_ties`, `breadcrumbs`, `breadcrumbs_ties`: how the task vectors
            (ingredient - pivot) are sparsified and sign-elected before AME (README "TIES and DARE").
        density: fraction of each task vector kept, one number or one per ingredient.
        gamma: breadcrumbs' fraction of largest entries dropped.
        rescale: `density`, `l1` or `none` (default: density for DARE, else none).
        disjoint_sum: sign-electing transforms average the agreeing entries over all ingredients (a sum, once the
            lr is multiplied by the weights' sum), not only over those that agree.
        dtype: output dtype; `auto` keeps each tensor's ingredient dtype.
        compute_dtype: `float32` or `float64`.
        max_shard_size: largest output shard (`5GB`, `500MB`, ...).
        allow_nonfinite: merge ingredients that contain NaN or Inf instead of refusing them.

    >>> AmeConfig(optimizer="AdamW", lr=1e-4).optimizer
    'adamw'
    """

    # Each field's metadata is its command-line option (`ame-hf merge --<name>`): `cli` says how it is
    # parsed (number, whole, flag, text, or a tuple of choices) and `help` what it means.
    optimizer: str = _option(DEFAULT_OPTIMIZER, "text", "torch.optim optimizer: " + ", ".join(
        sorted(OPTIMIZERS, key=lambda k: (k != DEFAULT_OPTIMIZER, k))) + f" (default {DEFAULT_OPTIMIZER})")
    lr: float | None = _option(None, "number", "plain torch.optim learning rate")
    relative_lr: float | None = _option(None, "number", "learning rate as a multiple of each tensor's "
                                        f"RMS(ingredient - pivot) (default {DEFAULT_RELATIVE_LR} for adaptive "
                                        "optimizers when --lr is not given)")
    optimizer_args: Mapping[str, Any] = _option(dict, "text", "other optimizer arguments as JSON, "
                                                'e.g. \'{"betas": [0.9, 0.99]}\'')
    schedule: str | None = _option(None, SCHEDULES, "learning-rate schedule (default: harmonic for sgd/asgd, "
                                   "else constant)")
    epochs: int = _option(1, "whole", "ensembling epochs (default 1)")
    batch_size: int = _option(1, "whole", "ingredients per pseudogradient (default 1)")
    pivot: str | int = _option(DEFAULT_PIVOT, "text", "starting point: mean (default), first, base (the "
                               "adapters' base model), an ingredient index, or a checkpoint REF")
    order: str | list[int] = _option(DEFAULT_ORDER, "text", "ingredient order of every epoch: given (default), "
                                     "reverse, or indices such as 2,0,1 (--shuffle then permutes this order)")
    shuffle: bool = _option(False, "flag", "shuffle the ingredient order every epoch")
    seed: int = _option(0, "whole", "seed of --shuffle and of DARE's drop mask (default 0)")
    weights: list[float] | None = _option(None, "text", "ingredient weights, one per ingredient, e.g. 0.5,0.3,0.2 "
                                          "(README: Ingredient weights)")
    transform: str = _option("none", TRANSFORMS, "transform the task vectors (ingredient - pivot) before AME: ties, "
                             "dare, dare_ties, breadcrumbs, breadcrumbs_ties (default none)")
    density: float | list[float] = _option(1.0, "text", "fraction of each task vector kept by --transform, or one "
                                           "per ingredient (default 1)")
    gamma: float | list[float] = _option(0.01, "text", "breadcrumbs: fraction of largest task-vector entries "
                                         "dropped (default 0.01)")
    rescale: str | None = _option(None, RESCALES, "rescale what --transform keeps: density (1/density, DARE's "
                                  "default), l1 (the task vector's L1 norm, mergekit's), none (the others' default)")
    disjoint_sum: bool = _option(False, "flag", "ties/dare_ties: average the agreeing entries over all ingredients, "
                                 "not only those that agree (mergekit's normalize: false, lr x weights' sum)")
    dtype: str = _option("auto", OUTPUT_DTYPES, "output dtype (default auto: the ingredients')")
    compute_dtype: str = _option("float32", COMPUTE_DTYPES, "compute dtype (default float32)")
    max_shard_size: str | int = _option(DEFAULT_MAX_SHARD_SIZE, "text", "largest output shard, e.g. 5GB "
                                        "(default), 500MB")
    allow_nonfinite: bool = _option(False, "flag", "merge ingredients that contain NaN/Inf instead of "
                                    "refusing them")
    base: str | None = _option(None, "text", "the base model of the PEFT adapters among the ingredients "
                               "(default: each adapter's base_model_name_or_path)")
    variant: str | None = _option(None, "text", "read the weights variant NAME (model.NAME.safetensors, "
                                  "transformers' variant naming), e.g. fp16")
    tokenizer_source: str | int = _option(DEFAULT_TOKENIZER_SOURCE, "text", "where the tokenizer, chat template "
                                          "and processor files come from: auto (default: the pivot's, or the first "
                                          "ingredient's; union when vocabularies differ), union (the source's tokens, "
                                          "then every token the others added), pivot, first, an ingredient index, "
                                          "or a REF")
    save_as: str = _option("model", SAVE_AS, "write a full model (default) or a PEFT LoRA adapter of the base "
                           "model (--base, or the adapters' own base)")
    adapter_rank: int | None = _option(None, "whole", "with --save-as adapter: the largest LoRA rank of a module "
                                       "(default: each module's delta's own rank, lossless)")
    adapter_energy: float | None = _option(None, "number", "with --save-as adapter: the smallest rank keeping this "
                                           "fraction of each delta's squared singular values, e.g. 0.99")

    def __post_init__(self) -> None:
        from .optimizers import check_optimizer_name, validate_optimizer_args

        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("optimizer", check_optimizer_name(self.optimizer))
        if isinstance(self.optimizer_args, str):
            set_("optimizer_args", parse_optimizer_args(self.optimizer_args))
        if not isinstance(self.optimizer_args, Mapping):
            raise InvalidConfigError(f"optimizer_args must be a mapping, got {type(self.optimizer_args).__name__}",
                                     field="optimizer_args")
        if self.lr is not None and self.relative_lr is not None:
            raise InvalidConfigError("give either lr or relative_lr, not both", fields=("relative_lr", "lr"))
        if self.lr is not None:
            set_("lr", positive_number("lr", self.lr))
        if self.relative_lr is not None:
            set_("relative_lr", positive_number("relative_lr", self.relative_lr))
        if self.schedule is not None:
            choice("schedule", self.schedule, SCHEDULES)
        whole_number("epochs", self.epochs)
        whole_number("batch_size", self.batch_size)
        whole_number("seed", self.seed, minimum=0)
        flag("shuffle", self.shuffle)
        flag("allow_nonfinite", self.allow_nonfinite)
        set_("pivot", normalize_pivot(self.pivot))
        for key, value in check_transform(self).items():
            set_(key, value)
        set_("order", normalize_order(self.order))
        set_("tokenizer_source", normalize_source(self.tokenizer_source))
        if isinstance(self.base, os.PathLike):
            set_("base", os.fspath(self.base))
        if self.variant is not None and (not isinstance(self.variant, str) or not self.variant.strip()
                                         or "/" in self.variant or "." in self.variant):
            raise InvalidConfigError(f"variant must be a plain name such as fp16, got {self.variant!r}",
                                     field="variant")
        if self.dtype not in OUTPUT_DTYPES and str(self.dtype).lower().startswith(("fp8", "float8", "mxfp", "fp4")):
            raise InvalidConfigError(f"dtype {self.dtype!r}: ame-hf writes a merge back in its quantized ingredients' "
                                     f"format as float8_e4m3fn (FP8, block-scaled) or mxfp4 (MXFP4) only; choose "
                                     f"one of: {', '.join(OUTPUT_DTYPES)}", field="dtype")
        choice("dtype", self.dtype, OUTPUT_DTYPES)
        choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        parse_size(self.max_shard_size, field="max_shard_size")
        _check_adapter_options(self)
        # Last: only the arguments need torch (the optimizer is built once), every other error comes first.
        args = validate_optimizer_args(self.optimizer, self.optimizer_args)
        set_("optimizer_args", {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()})

    # -- resolution -------------------------------------------------------------------------
    def resolved(self) -> "AmeConfig":
        """The same config with every default made explicit (what is recorded and reproduced)."""
        from .optimizers import SGD_FAMILY

        sgd_like = self.optimizer in SGD_FAMILY
        lr, relative_lr = self.lr, self.relative_lr
        if lr is None and relative_lr is None:
            if sgd_like:
                lr = 1.0
            else:
                relative_lr = DEFAULT_RELATIVE_LR
        schedule = self.schedule or ("harmonic" if sgd_like else "constant")
        return dataclasses.replace(self, lr=lr, relative_lr=relative_lr, schedule=schedule)

    @property
    def pivot_refs(self) -> list[str]:
        """`[the pivot's checkpoint reference]` when the pivot is another checkpoint, else `[]`."""
        return [self.pivot] if isinstance(self.pivot, str) and self.pivot not in PIVOT_WORDS else []

    @property
    def tokenizer_refs(self) -> list[str]:
        """`[the tokenizer source's reference]` when it is another checkpoint, else `[]`."""
        return [self.tokenizer_source] if isinstance(self.tokenizer_source, str) and self.tokenizer_source not in (
            SOURCE_WORDS) else []

    @property
    def other_refs(self) -> list[str]:
        """Every checkpoint reference the run reads besides the ingredients: the pivot, the base, the
        tokenizer source (for the checks of `--out` against the inputs)."""
        return [*self.pivot_refs, *([self.base] if self.base else []), *self.tokenizer_refs]

    @property
    def is_soup(self) -> bool:
        """True when this config computes exactly the soup: uniform, or weighted by `weights` (DESIGN §1)."""
        cfg = self.resolved()
        return (
            cfg.optimizer == "sgd" and cfg.lr == 1.0 and cfg.schedule == "harmonic" and cfg.transform == "none"
            and cfg.batch_size == 1 and not any(cfg.optimizer_args.get(k) for k in
                                               ("momentum", "weight_decay", "dampening", "nesterov"))
        )

    @classmethod
    def soup(cls, **kwargs: Any) -> "AmeConfig":
        """The uniform model soup as an AME config: SGD, lr 1, harmonic schedule."""
        return cls(optimizer="sgd", lr=1.0, schedule="harmonic", **kwargs)

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain types only (safe for YAML/JSON)."""
        out = dataclasses.asdict(self)
        out["optimizer_args"] = json.loads(json.dumps(dict(self.optimizer_args)))
        return out

    def to_yaml(self) -> str:
        """`to_dict` as YAML text: `AmeConfig.from_dict(yaml.safe_load(text))` is an equal config."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AmeConfig":
        """Build from a mapping (e.g. `recipe.read_recipe(path).values`).

        Raises:
            InvalidConfigError: an unknown key (with the closest valid one, and the list), or an invalid value.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [str(k) for k in data if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InvalidConfigError(f"unknown config key(s): {', '.join(unknown)}{hint}; valid keys: {', '.join(names)}")
        return cls(**dict(data))


OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(AmeConfig) if f.name not in WEIGHT_FIELDS)


def _check_adapter_options(config: AmeConfig) -> None:
    """`save_as` and the rank options, which apply only to an adapter."""
    choice("save_as", config.save_as, SAVE_AS)
    if config.adapter_rank is not None:
        object.__setattr__(config, "adapter_rank", whole_number("adapter_rank", config.adapter_rank))
    if config.adapter_energy is not None:
        energy = positive_number("adapter_energy", config.adapter_energy)
        if energy > 1:
            raise InvalidConfigError(f"adapter_energy is a fraction in (0, 1], got {energy:g}; e.g. 0.99",
                                     field="adapter_energy")
        object.__setattr__(config, "adapter_energy", energy)
    given = [f for f in ("adapter_rank", "adapter_energy") if getattr(config, f) is not None]
    if given and config.save_as != "adapter":
        raise InvalidConfigError(f"{' and '.join(given)} apply only to an adapter: add save_as='adapter'",
                                 fields=(*given, "save_as"))


def normalize_pivot(pivot: Any) -> str | int:
    """`mean`, `first`, a non-negative index, or a checkpoint reference (kept as a string)."""
    if isinstance(pivot, bool) or pivot is None:
        raise InvalidConfigError(f"invalid pivot {pivot!r}; use mean, first, an index or a checkpoint", field="pivot")
    if isinstance(pivot, int):
        if pivot < 0:
            raise InvalidConfigError(f"pivot index must be >= 0, got {pivot}", field="pivot")
        return pivot
    text = str(pivot).strip()
    if not text:
        raise InvalidConfigError("pivot must not be empty; use mean, first, an index or a checkpoint", field="pivot")
    if text.lstrip("-").isdigit():
        return normalize_pivot(int(text))
    return text.lower() if text.lower() in PIVOT_WORDS else text


def normalize_order(order: Any) -> str | list[int]:
    """`given`, `reverse`, or a list of distinct non-negative indices (from a list or text `2,0,1`).

    Whether a list is a permutation of the ingredients is checked by `order_indices`, once N is known.

    >>> normalize_order("2, 0, 1"), normalize_order("Reverse")
    ([2, 0, 1], 'reverse')
    """
    if isinstance(order, str) and order.strip().lower() in ORDERS:
        return order.strip().lower()
    if isinstance(order, str):
        parts = [p.strip() for p in order.replace("[", "").replace("]", "").split(",")]
        if not all(p.isdigit() for p in parts):
            raise InvalidConfigError(f"invalid order {order!r}; use given, reverse or indices such as 2,0,1",
                                     field="order")
        order = [int(p) for p in parts]
    if not isinstance(order, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                       for i in order):
        raise InvalidConfigError(f"invalid order {order!r}; use given, reverse or indices such as 2,0,1", field="order")
    if len(set(order)) != len(order) or not order:
        raise InvalidConfigError(f"order {list(order)} must list each ingredient index once", field="order")
    return list(order)


def order_indices(order: str | list[int], n: int) -> list[int]:
    """The ingredient indices of one epoch (before any shuffle) for `n` ingredients.

    Raises:
        InvalidConfigError: a list of indices that is not a permutation of 0..n-1.

    >>> order_indices("reverse", 3), order_indices([1, 2, 0], 3)
    ([2, 1, 0], [1, 2, 0])
    """
    if order == "given":
        return list(range(n))
    if order == "reverse":
        return list(range(n - 1, -1, -1))
    if sorted(order) != list(range(n)):
        raise InvalidConfigError(f"order {','.join(map(str, order))} is not a permutation of the {n} ingredient "
                                 f"indices 0..{n - 1}", field="order")
    return list(order)


def normalize_source(source: Any) -> str | int:
    """`auto`, `union`, `pivot`, `first`, a non-negative ingredient index, or a checkpoint reference."""
    if isinstance(source, bool) or source is None:
        raise InvalidConfigError(f"invalid tokenizer_source {source!r}; use auto, union, pivot, first, an index or a "
                                 "checkpoint", field="tokenizer_source")
    if isinstance(source, int) or str(source).strip().lstrip("-").isdigit():
        index = int(source)
        if index < 0:
            raise InvalidConfigError(f"tokenizer_source index must be >= 0, got {index}", field="tokenizer_source")
        return index
    text = str(source).strip()
    if not text:
        raise InvalidConfigError("tokenizer_source must not be empty; use auto, union, pivot, first, an index or a "
                                 "checkpoint", field="tokenizer_source")
    return text.lower() if text.lower() in SOURCE_WORDS else text


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """Parse `optimizer_args` given as JSON text into a dict, with one clear error when malformed."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as err:
        raise InvalidConfigError(f"optimizer_args is not valid JSON ({err.msg} at column {err.colno}); "
                                 'example: \'{"betas": [0.9, 0.99]}\'', field="optimizer_args") from err
    if not isinstance(value, dict):
        raise InvalidConfigError('optimizer_args must be a JSON object, e.g. \'{"betas": [0.9, 0.99]}\'',
                                 field="optimizer_args")
    return value


# Re-exported: `--config` files are read where the config is.
load_yaml_mapping = _yaml_mapping.load_yaml_mapping
