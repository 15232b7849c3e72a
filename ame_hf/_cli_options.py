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


# What each AmeConfig option's value is, as `--help` shows it (argparse's default is the flag in capitals).
METAVARS = {"optimizer": "NAME", "lr": "LR", "relative_lr": "C", "optimizer_args": "JSON", "epochs": "N",
            "batch_size": "N", "pivot": "PIVOT", "order": "ORDER", "seed": "N", "max_shard_size": "SIZE",
            "base": "REF", "variant": "NAME", "tokenizer_source": "SOURCE",
            "adapter_rank": "R", "adapter_energy": "FRACTION"}
REF_HELP = "a local model folder, or a Hub repo ID org/name[@revision] (a PEFT LoRA adapter too)"


def add_config_options(p: Any, only: Sequence[str] | None = None) -> None:
    """One option per `AmeConfig` field (or per field named in `only`), from the field's own metadata: the
    one source of truth. Each defaults to None, so `config_values` sees only what was given. `p` may be a
    parser or an argument group."""
    kinds: dict[str, dict[str, Any]] = {"number": {"type": number}, "whole": {"type": whole}, "text": {},
                                        "flag": {"action": "store_true", "default": None}}
    for f in (f for f in dataclasses.fields(AmeConfig) if only is None or f.name in only):
        cli = f.metadata["cli"]
        kwargs = {"choices": list(cli)} if isinstance(cli, tuple) else dict(kinds[cli])
        if f.name in METAVARS and cli != "flag":
            kwargs["metavar"] = METAVARS[f.name]
        p.add_argument("--" + f.name.replace("_", "-"), help=f.metadata["help"], **kwargs)


def command_parser(sub: Any, name: str, *, help: str, description: str, examples: Sequence[str]) -> Any:
    """A subcommand's parser with its description and an examples epilog (shown as written)."""
    return sub.add_parser(name, help=help, description=description,
                          epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def version_text(version: str) -> str:
    """`ame-hf --version`: its version and those of what it runs on (as `hf env` reports them), read from the
    installed packages' metadata (nothing imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def of(name: str) -> str:
        try:
            return installed(name)
        except PackageNotFoundError:
            return "not installed"

    parts = [f"{name} {of(name)}" for name in ("torch", "transformers", "huggingface_hub", "safetensors",
                                                "accelerate", "peft")]
    return f"ame-hf {version}\n" + "\n".join(parts) + f"\nPython {platform.python_version()} ({platform.platform()})"


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The `AmeConfig` fields given on the command line (of those this command has)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(AmeConfig)
            if getattr(args, f.name, None) is not None}


def add_common(p: argparse.ArgumentParser) -> None:
    """`-q/--quiet` and `--debug`, in a "logging" group."""
    g = p.add_argument_group("logging")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info messages")
    g.add_argument("--debug", action="store_true", help="show the full traceback of errors")


def add_token(p: argparse.ArgumentParser) -> None:
    """`--token`."""
    p.add_argument("--token", default=None,
                   help="Hugging Face token (default: HF_TOKEN or the login cache); never printed or stored")
