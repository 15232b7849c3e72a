"""Every command's options checked in one place, before torch or the Hub client is imported.

The CLI and the Python API call the same checks. An error is an `InvalidConfigError` naming the Python
keyword (its `field`); the CLI shows that keyword as its flag.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from ._validators import parse_size, whole_number
from .config import CHECK_FIELDS, WEIGHT_FIELDS, AmeConfig, order_indices
from .errors import InvalidConfigError
from .transform_options import check_ingredient_lists


def config_with(config: AmeConfig | None, options: Mapping[str, Any]) -> AmeConfig:
    """`config` (default: `AmeConfig()`) with `options` (AmeConfig keywords) replaced, validated.

    Raises:
        InvalidConfigError: an unknown keyword (with the closest valid one) or an invalid value.
    """
    if config is None:
        return AmeConfig.from_dict(options)
    if not isinstance(config, AmeConfig):
        raise InvalidConfigError(f"config must be an AmeConfig, got {type(config).__name__}", field="config")
    return AmeConfig.from_dict({**{f.name: getattr(config, f.name) for f in dataclasses.fields(AmeConfig)}, **options})


def ingredient_count(config: AmeConfig, n: int, *, least: int = 2) -> None:
    """What `config` asks of `n` ingredients: at least `least` of them, a pivot or tokenizer-source index among
    them, an `order` that permutes them, and batches no larger than `n`.

    Raises:
        InvalidConfigError: the first of these that fails.
    """
    if n < least:
        what = "AME needs" if least == 2 else "give"
        raise InvalidConfigError(f"{what} at least {least} ingredient{'s' if least > 1 else ''}, got {n}; list every "
                                 "checkpoint to merge")
    if isinstance(config.pivot, int) and config.pivot >= n:
        raise InvalidConfigError(f"pivot index {config.pivot} is out of range for {n} ingredients (use 0..{n - 1})",
                                 field="pivot")
    if isinstance(config.tokenizer_source, int) and config.tokenizer_source >= n:
        raise InvalidConfigError(f"tokenizer_source index {config.tokenizer_source} is out of range for {n} "
                                 f"ingredients (use 0..{n - 1})", field="tokenizer_source")
    order_indices(config.order, n)
    check_ingredient_lists(config, n)
    if config.batch_size > n:
        raise InvalidConfigError(f"batch_size {config.batch_size} is larger than the number of ingredients ({n})",
                                 field="batch_size")


def merge_options(ingredients: Sequence[str | os.PathLike], config: AmeConfig, *, threads: int | None = None,
                  max_memory: str | int | None = None) -> None:
    """The options of `merge` besides the `AmeConfig` itself (validated when it was built).

    Raises:
        InvalidConfigError: as `ingredient_count`, `threads` < 1, or a `max_memory` that is no size.
    """
    ingredient_count(config, len(ingredients))
    if threads is not None:
        whole_number("threads", threads)
    if max_memory is not None:
        parse_size(max_memory, field="max_memory")


def check_options(ingredients: Sequence[str | os.PathLike], *, dtype: str | None = None,
                  pivot: str | int | os.PathLike | None = None, base: str | os.PathLike | None = None,
                  variant: str | None = None, tokenizer_source: str | int | os.PathLike | None = None) -> AmeConfig:
    """The options of `check` as the `AmeConfig` a merge would run with (they mean what they mean in `merge`).

    None leaves an option at merge's default. Returns a config with only `CHECK_FIELDS` set.

    Raises:
        InvalidConfigError: an invalid value, or an index that names no ingredient.
    """
    given = {"dtype": dtype, "pivot": pivot, "base": base, "variant": variant, "tokenizer_source": tokenizer_source}
    assert set(given) == set(CHECK_FIELDS)
    config = AmeConfig(**{k: os.fspath(v) if isinstance(v, os.PathLike) else v
                          for k, v in given.items() if v is not None})
    ingredient_count(config, len(ingredients), least=1)
    return config


def evaluation_options(*, max_length: int | None = None, batch_size: int | None = None) -> None:
    """The options of an evaluation (`evaluate`, `tune`, the greedy soup).

    Raises:
        InvalidConfigError: `max_length` or `batch_size` given and not a whole number >= 1.
    """
    for name, value in (("max_length", max_length), ("batch_size", batch_size)):
        if value is not None:
            whole_number(name, value)


def tune_options(ingredients: Sequence[str | os.PathLike], *, budget: int, config: AmeConfig | None = None,
                 base: str | os.PathLike | None = None, max_length: int | None = None,
                 batch_size: int | None = None) -> AmeConfig:
    """The options of `tune`, and the output options it passes to every merge (`config` with `base`).

    `tune` tries its own AME variants, so `config` may set only the fields that are not `WEIGHT_FIELDS`
    (dtype, max_shard_size, variant, compute_dtype, tokenizer_source, allow_nonfinite, base).

    Raises:
        InvalidConfigError: a negative budget, a weight-deciding field in `config`, a `base` that differs from
            `config.base`, or as `evaluation_options` and `ingredient_count`.
    """
    whole_number("budget", budget, minimum=0)
    evaluation_options(max_length=max_length, batch_size=batch_size)
    output = config_with(config, {})
    default = AmeConfig()
    weights = [f for f in WEIGHT_FIELDS if getattr(output, f) != getattr(default, f)]
    if weights:
        raise InvalidConfigError(f"tune tries its own AME variants (grid=), so config holds output options only; "
                                 f"drop {', '.join(weights)}", fields=weights)
    if base:
        base = os.fspath(base)
        if output.base is not None and output.base != base:
            raise InvalidConfigError(f"base {base!r} differs from the config's base {output.base!r}; give one",
                                     field="base")
        output = dataclasses.replace(output, base=base)
    ingredient_count(output, len(ingredients))
    return output
