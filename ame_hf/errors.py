"""Every exception ame-hf raises on purpose.

The CLI turns any `AmeError` into one line and a non-zero exit; `--debug` shows the traceback. Messages name
Python keywords (`out_dir`, `overwrite=True`), never CLI flags: each error's `fields` lists the keywords its
message names, and the CLI shows them as flags (`--out`, `--overwrite`). Each class also inherits from the
built-in it resembles, so callers can catch either::

    AmeError                                    `.fields`: the keywords its message names (`.field`: the first)
    ├── InvalidConfigError (ValueError)         bad option, YAML or optimizer argument
    │   ├── UnknownOptimizerError               no optimizer of that name
    │   └── UnsupportedOptimizerError           a torch.optim optimizer AME cannot drive (LBFGS, ...)
    ├── IngredientNotFoundError (FileNotFoundError)
    │                                           local path, repo, revision or file that does not exist
    ├── CheckpointError (ValueError)            unreadable, corrupt or unsafe weights / config
    ├── IncompatibleCheckpointsError (ValueError)
    │                                           ingredients that cannot be merged (carries the report)
    ├── OutputError (OSError)                   `out_dir` exists, is not writable, disk full, ...
    │   └── InsufficientSpaceError              not enough free space for the download
    └── HubError (OSError)                      authentication, network and push failures
        └── PushError                           the upload failed; the local output is intact
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

__all__ = [
    "AmeError",
    "CheckpointError",
    "HubError",
    "IncompatibleCheckpointsError",
    "IngredientNotFoundError",
    "InsufficientSpaceError",
    "InvalidConfigError",
    "OutputError",
    "PushError",
    "UnknownOptimizerError",
    "UnsupportedOptimizerError",
]


class AmeError(Exception):
    """Base class of every error ame-hf raises on purpose.

    Args:
        message: one line, naming keywords as the Python API spells them (`out_dir`, `device='cpu'`,
            `overwrite=True`), never a CLI flag.
        field: the keyword the error is about, when it is one.
        fields: every keyword the message names (`lr` and `relative_lr` for a conflict); the CLI shows each
            as its flag (`--relative-lr`). Default: `field`.

    >>> err = AmeError("give either lr or relative_lr, not both", fields=("lr", "relative_lr"))
    >>> err.field, err.fields
    ('lr', ('lr', 'relative_lr'))
    """

    def __init__(self, message: str = "", *, field: str | None = None, fields: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.fields: tuple[str, ...] = tuple(fields) or ((field,) if field else ())
        self.field = field or next(iter(self.fields), None)


class InvalidConfigError(AmeError, ValueError):
    """An option, a YAML config or an optimizer argument is invalid; `field` is its keyword (`epochs`,
    `relative_lr`), when it is one."""


class UnknownOptimizerError(InvalidConfigError):
    """No optimizer has that name; the message lists the valid ones."""


class UnsupportedOptimizerError(InvalidConfigError):
    """A real `torch.optim` optimizer that AME cannot drive: it needs a closure (LBFGS) or couples
    elements across a tensor (Adafactor, Muon)."""


class IngredientNotFoundError(AmeError, FileNotFoundError):
    """A local directory, Hub repo, revision or file does not exist.

    `ref` is the reference as the user gave it (`org/name@rev`, `./path`), when known.
    """

    def __init__(self, message: str, *, ref: str | None = None, field: str | None = None,
                 fields: Sequence[str] = ()) -> None:
        super().__init__(message, field=field, fields=fields)
        self.ref = ref


class CheckpointError(AmeError, ValueError):
    """A checkpoint's weights or config cannot be read safely.

    `path` is the checkpoint's directory (or file) and `tensor` the tensor's name, when known.
    """

    def __init__(self, message: str, *, path: Any = None, tensor: str | None = None, field: str | None = None,
                 fields: Sequence[str] = ()) -> None:
        super().__init__(message, field=field, fields=fields)
        self.path = path
        self.tensor = tensor


class IncompatibleCheckpointsError(AmeError, ValueError):
    """The ingredients differ in architecture, tensor names, shapes or dtypes.

    `report` is the full `CompatibilityReport` (every difference, not only the first).
    """

    def __init__(self, message: str, report: Any = None, *, field: str | None = None,
                 fields: Sequence[str] = ()) -> None:
        super().__init__(message, field=field, fields=fields)
        self.report = report


class OutputError(AmeError, OSError):
    """The output directory cannot be written (exists, not writable, disk full, ...); `path` is `out_dir`."""

    def __init__(self, message: str, *, path: Any = None, field: str | None = None,
                 fields: Sequence[str] = ()) -> None:
        super().__init__(message, field=field, fields=fields)
        self.path = path


class InsufficientSpaceError(OutputError):
    """The disk lacks the space for the download (or the output); `path` is where it would go."""


class HubError(AmeError, OSError):
    """The Hub could not be reached, refused the token, or refused the request; `repo_id`, when known."""

    def __init__(self, message: str, *, repo_id: str | None = None, field: str | None = None,
                 fields: Sequence[str] = ()) -> None:
        super().__init__(message, field=field, fields=fields)
        self.repo_id = repo_id


def keywords_named(message: str, keywords: Iterable[str]) -> tuple[str, ...]:
    """The `keywords` a message names as a caller passes them (`base=REF`, `pivot='mean'`, `overwrite=True`): the
    `fields` of an error raised with a message that was written elsewhere (a compatibility report's line).

    Args:
        message: the message.
        keywords: the keywords that may be named.

    Returns:
        Those named so, in the order of `keywords`.

    >>> keywords_named("pivot='base' needs PEFT adapters, or base=REF; the base model ...", ["base", "dtype", "pivot"])
    ('base', 'pivot')
    """
    return tuple(k for k in keywords if re.search(r"(?<![\w./-])" + re.escape(k) + "=", message))


class PushError(HubError):
    """An upload failed; the local output is left intact."""
