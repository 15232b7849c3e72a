"""What the files of a model folder say, read once and the same way everywhere: its `config.json`, and the
module folders of a sentence-transformers model (`modules.json`). No torch, no Hub client: the CLI's checks use it
before either loads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# Weights (and other binary model formats); code is never fetched nor copied. Everything else of a repo is light.
WEIGHT_PATTERNS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx",
                   "*.onnx_data", "*.tflite", "*.ot", "*.npz"]
CODE_PATTERNS = ["*.py", "*.pyc", "*.so", "*.dll", "*.dylib", ".gitattributes"]
CONFIG_NAME = "config.json"  # transformers.utils.CONFIG_NAME (not imported: it loads transformers)
MODULES_NAME = "modules.json"  # sentence-transformers' list of a model's modules


def read_config(path: str | os.PathLike, name: str) -> dict[str, Any]:
    """A model folder's `config.json` as a dict: the one reader of it (merge, check, evaluate, tune).

    Args:
        path: the model folder (local, or a Hub snapshot in the cache).
        name: how to call the model in messages (the user's reference).

    Returns:
        The config as a dict.

    Raises:
        CheckpointError: no `config.json`, not JSON, or not a JSON object (one line naming `name`).

    >>> read_config("./my-model", "./my-model")["model_type"]  # doctest: +SKIP
    'llama'
    """
    folder = Path(path)
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{name}: no {CONFIG_NAME} in {folder}; ame-hf merges transformers model folders "
                              "(or PEFT adapters, with adapter_config.json)", path=folder)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{name}: {CONFIG_NAME} is not valid JSON ({err})", path=folder) from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{name}: {CONFIG_NAME} must hold a JSON object", path=folder)
    return config


def module_folders(path: str | os.PathLike, name: str) -> list[str]:
    """The module folders a sentence-transformers model lists in `modules.json` (the module stored in the model
    folder itself left out), in order; [] for a model without `modules.json`.

    Raises:
        CheckpointError: `modules.json` is not a list of modules, or names a folder outside the model (one line
            naming `name`).
    """
    file = Path(path) / MODULES_NAME
    if not file.is_file():
        return []
    try:
        modules = json.loads(file.read_text(encoding="utf-8"))
        folders = [m.get("path", "") for m in modules]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{name}: {MODULES_NAME} is not a list of modules ({err})", path=Path(path)) from err
    for folder in folders:
        parts = Path(str(folder)).parts
        if not isinstance(folder, str) or Path(folder).is_absolute() or ".." in parts or "\\" in folder:
            raise CheckpointError(f"{name}: {MODULES_NAME} names the module folder {folder!r}, outside the model",
                                  path=Path(path))
    return [f.strip("/") for f in folders if f.strip("/") not in ("", ".")]


def project_url() -> str:
    """The project's URL, set once in the package metadata (setup.cfg `url`): the card and the Space link it.

    >>> project_url().startswith("https://")
    True
    """
    import importlib.metadata

    try:
        return importlib.metadata.metadata("ame-hf").get("Home-page") or PROJECT_URL
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return PROJECT_URL


PROJECT_URL = "https://github.com/ame-hf/ame-hf"  # only when ame-hf is not installed; setup.cfg's url is the one
