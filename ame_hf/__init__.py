"""ame-hf: fuse fine-tuned Hugging Face checkpoints into one model by Amortized Model Ensembling.

Public names are imported lazily so that `import ame_hf` and `ame-hf --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AmeConfig": "config",
    "AmeError": "errors",
    "Checkpoint": "checkpoint",
    "CheckpointError": "errors",
    "CompatibilityReport": "compatibility",
    "HubError": "errors",
    "IncompatibleCheckpointsError": "errors",
    "Ingredient": "records",
    "IngredientNotFoundError": "errors",
    "InvalidConfigError": "errors",
    "MergeResult": "records",
    "OutputError": "errors",
    "PushError": "errors",
    "UnknownOptimizerError": "errors",
    "check": "api",
    "from_pretrained": "api",
    "merge": "merging",
    "push_to_hub": "api",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ame_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
