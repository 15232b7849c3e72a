"""Reading a YAML mapping of options from a file or from text (`--config`, `ame_config.yaml`), with one clear error
when it is unreadable or not a mapping."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import InvalidConfigError


def load_yaml_mapping(text_or_path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping from a file path or from YAML text."""
    import yaml

    text = str(text_or_path)
    source = "config"
    if isinstance(text_or_path, os.PathLike) or ("\n" not in text and (
            text.endswith((".yaml", ".yml")) or Path(text).is_file())):
        path = Path(text_or_path)
        if not path.is_file():
            raise InvalidConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidConfigError(f"cannot read config file {path}: {err}") from err
        source = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise InvalidConfigError(f"{source} is not valid YAML{at}: {getattr(err, 'problem', err)}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidConfigError(f"{source} must be a YAML mapping of option: value")
    return data
