"""The option builders every `ame-hf` command shares: value types, `AmeConfig` fields as flags, `--token`,
`--quiet` and `--debug`. Imports neither torch nor the Hub client."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Sequence

from .config import AmeConfig


def number(text: str) -> float:
    """An argparse type: a float, or one line saying what was expected."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a number, e.g. 1e-4") from None


def whole(text: str) -> int:
    """An argparse type: an int, or one line saying what was expected."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a whole number, e.g. 3") from None


def add_config_options(p: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One option per `AmeConfig` field (or per field named in `only`), from the field's own metadata: the
    one source of truth. Each defaults to None, so `config_values` sees only what was given."""
    kinds: dict[str, dict[str, Any]] = {"number": {"type": number}, "whole": {"type": whole}, "text": {},
                                        "flag": {"action": "store_true", "default": None}}
    for f in (f for f in dataclasses.fields(AmeConfig) if only is None or f.name in only):
        cli = f.metadata["cli"]
        kwargs = {"choices": list(cli)} if isinstance(cli, tuple) else dict(kinds[cli])
        p.add_argument("--" + f.name.replace("_", "-"), help=f.metadata["help"], **kwargs)


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The `AmeConfig` fields given on the command line (of those this command has)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(AmeConfig)
            if getattr(args, f.name, None) is not None}


def add_common(p: argparse.ArgumentParser) -> None:
    """`--quiet` and `--debug`."""
    p.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    p.add_argument("--debug", action="store_true", help="show the full traceback of errors")


def add_token(p: argparse.ArgumentParser) -> None:
    """`--token`."""
    p.add_argument("--token", default=None,
                   help="Hugging Face token (default: HF_TOKEN or the login cache); never printed or stored")
