"""Checks of single option values (a whole number, a positive number, a flag, a choice, a size), each naming
the keyword it checks in its `InvalidConfigError`; `AmeConfig` and every command's options use them."""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import InvalidConfigError


def parse_size(size: str | int, *, field: str = "size") -> int:
    """Parse a Hugging Face size string ("5GB", "500MB", "2GiB") or a number of bytes (an int) into bytes.

    A string needs its unit: "5" is refused (5 bytes is written "5B"), as it is almost always a slip.

    Args:
        size: the size.
        field: the keyword the size was given as (`max_shard_size`, `max_memory`), for the error.

    Raises:
        InvalidConfigError: not a size, a string without a unit, or not positive.

    >>> parse_size("5GB"), parse_size(1000)
    (5000000000, 1000)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise InvalidConfigError(f"invalid {field} {size!r}; use e.g. 5GB, 500MB or 2GiB", field=field)
    if isinstance(size, int):
        if size <= 0:
            raise InvalidConfigError(f"{field} must be positive, got {size}", field=field)
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise InvalidConfigError(f"invalid {field} {size!r}; use e.g. 5GB, 500MB or 2GiB", field=field)
    if match.group(2) is None:
        raise InvalidConfigError(f"{field} {size!r} has no unit; write e.g. {match.group(1)}GB or {match.group(1)}MB "
                                 f"({match.group(1)}B for bytes)", field=field)
    number, unit = float(match.group(1)), match.group(2).upper()
    factors = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    value = int(number * factors[unit])
    if value <= 0:
        raise InvalidConfigError(f"{field} must be positive, got {size!r}", field=field)
    return value


def whole_number(name: str, value: Any, *, minimum: int = 1) -> int:
    """`value` if it is a whole number >= `minimum`.

    Raises:
        InvalidConfigError: anything else, naming the keyword `name` (its `field`).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}", field=name)
    return value


def positive_number(name: str, value: Any) -> float:
    """`value` as a float if it is a finite number > 0, else an InvalidConfigError naming `name`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidConfigError(f"{name} must be a number, got {value!r}", field=name) from None
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise InvalidConfigError(f"{name} must be a finite number > 0, got {value!r}", field=name)
    return number


def flag(name: str, value: Any) -> None:
    """An InvalidConfigError naming `name` unless `value` is True or False."""
    if not isinstance(value, bool):
        raise InvalidConfigError(f"{name} must be true or false, got {value!r}", field=name)


def choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """An InvalidConfigError naming `name` and listing `choices` unless `value` is one of them."""
    if value not in choices:
        raise InvalidConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}", field=name)
