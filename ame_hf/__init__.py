"""ame-hf: fuse fine-tuned Hugging Face checkpoints into one model by Amortized Model Ensembling.

Public names are imported lazily so that `import ame_hf` and `ame-hf --help` stay fast; the
`TYPE_CHECKING` block below gives type checkers and IDEs their real signatures.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import check, evaluate, from_pretrained, push_to_hub
    from .checkpoint import Checkpoint
    from .compatibility import CompatibilityReport
    from .config import AmeConfig
    from .errors import (AmeError, CheckpointError, HubError, IncompatibleCheckpointsError, IngredientNotFoundError,
                         InsufficientSpaceError, InvalidConfigError, OutputError, PushError, UnknownOptimizerError,
                         UnsupportedOptimizerError)
    from .merging import merge
    from .records import Evaluation, Ingredient, MergeResult, PushInfo
    from .selection import GreedySoupResult, greedy_soup
    from .tuning import TuneResult, tune

_LAZY = {
    "AmeConfig": "config",
    "AmeError": "errors",
    "Checkpoint": "checkpoint",
    "CheckpointError": "errors",
    "CompatibilityReport": "compatibility",
    "Evaluation": "records",
    "GreedySoupResult": "selection",
    "HubError": "errors",
    "IncompatibleCheckpointsError": "errors",
    "Ingredient": "records",
    "IngredientNotFoundError": "errors",
    "InsufficientSpaceError": "errors",
    "InvalidConfigError": "errors",
    "MergeResult": "records",
    "OutputError": "errors",
    "PushError": "errors",
    "PushInfo": "records",
    "TuneResult": "tuning",
    "UnknownOptimizerError": "errors",
    "UnsupportedOptimizerError": "errors",
    "check": "api",
    "evaluate": "api",
    "from_pretrained": "api",
    "greedy_soup": "selection",
    "merge": "merging",
    "push_to_hub": "api",
    "tune": "tuning",
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
