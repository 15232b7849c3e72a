"""Every exception ame-hf raises on purpose.

The CLI turns any `AmeError` into one line and a non-zero exit; `--debug` shows the traceback.
Each class also inherits from the built-in it resembles, so callers can catch either::

    AmeError
    ├── InvalidConfigError (ValueError)         bad option, YAML or optimizer argument
    │   └── UnknownOptimizerError               optimizer name not in the registry (or refused)
    ├── IngredientNotFoundError (FileNotFoundError)
    │                                           local path, repo, revision or file that does not exist
    ├── CheckpointError (ValueError)            unreadable, corrupt or unsafe weights / config
    ├── IncompatibleCheckpointsError (ValueError)
    │                                           ingredients that cannot be merged (carries the report)
    ├── OutputError (OSError)                   --out exists, is not writable, disk full, ...
    └── HubError (OSError)                      authentication, network and push failures
        └── PushError                           the upload failed; the local output is intact
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AmeError",
    "CheckpointError",
    "HubError",
    "IncompatibleCheckpointsError",
    "IngredientNotFoundError",
    "InvalidConfigError",
    "OutputError",
    "PushError",
    "UnknownOptimizerError",
]


class AmeError(Exception):
    """Base class of every error ame-hf raises on purpose."""


class InvalidConfigError(AmeError, ValueError):
    """An option, a YAML config or an optimizer argument is invalid."""


class UnknownOptimizerError(InvalidConfigError):
    """The optimizer name is unknown, or names an optimizer AME cannot drive (LBFGS)."""


class IngredientNotFoundError(AmeError, FileNotFoundError):
    """A local directory, Hub repo, revision or file does not exist."""


class CheckpointError(AmeError, ValueError):
    """A checkpoint's weights or config cannot be read safely."""


class IncompatibleCheckpointsError(AmeError, ValueError):
    """The ingredients differ in architecture, tensor names, shapes or dtypes.

    `report` is the full `CompatibilityReport` (every difference, not only the first).
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class OutputError(AmeError, OSError):
    """The output directory cannot be written (exists, not writable, disk full, ...)."""


class HubError(AmeError, OSError):
    """The Hub could not be reached, refused the token, or refused the request."""


class PushError(HubError):
    """An upload failed; the local output is left intact."""
