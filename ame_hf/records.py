"""Plain records that pass between the stages of a merge: a resolved ingredient, the result of a
merge and of a push. No behaviour beyond naming; no torch, no Hub client."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compatibility import CompatibilityReport
    from .config import AmeConfig

__all__ = ["Evaluation", "HubSource", "Ingredient", "MergeResult", "PushInfo"]


@dataclass(frozen=True, kw_only=True)
class Ingredient:
    """One resolved checkpoint reference.

    Attributes:
        ref: the reference as the user gave it (`org/name@v1`, `./local`).
        path: the local directory holding its files.
        repo_id: the Hub repo ID, or None for a local directory.
        revision: the revision asked for (branch, tag, sha), or None.
        sha: the resolved 40-character commit sha (Hub only).
    """

    ref: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    sha: str | None = None

    @property
    def pinned_ref(self) -> str:
        """A reference that always resolves to the same files (`org/name@<sha>`, or the path)."""
        return f"{self.repo_id}@{self.sha}" if self.repo_id and self.sha else str(self.ref)

    @property
    def identity(self) -> str:
        """What names these files wherever the run starts: `org/name@<sha>`, or the real local path."""
        return self.pinned_ref if self.repo_id else os.path.realpath(self.path)

    def recipe_ref(self, out: str | os.PathLike) -> str:
        """The reference to record in `out`'s ame_config.yaml: pinned, and for a local directory
        relative to `out`, which is how `--config` reads it back."""
        return self.pinned_ref if self.repo_id else os.path.relpath(Path(self.path).absolute(), Path(out).absolute())

    @property
    def display_name(self) -> str:
        return self.repo_id or str(self.ref)


@dataclass(frozen=True, kw_only=True)
class HubSource:
    """A Hub reference checked but not downloaded yet: its repo, the commit it resolved to, and its files.

    Attributes:
        ref: the reference as the user gave it.
        repo_id, revision: as in `Ingredient`.
        sha: the resolved 40-character commit sha (None offline: the cache decides).
        files: file name -> size in bytes (None when the Hub did not say), at that commit.
    """

    ref: str
    repo_id: str
    revision: str | None = None
    sha: str | None = None
    files: dict[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class MergeResult:
    """What `merge` produced.

    Attributes:
        path: the output directory (a `from_pretrained`-loadable model).
        config: the fully resolved `AmeConfig` that was run.
        ingredients: the resolved ingredients, in the user's order (repo ID + resolved sha).
        order: the ingredient indices used in each epoch.
        pivot: the pivot (`mean`, an index, or the resolved pivot `Ingredient`).
        seconds: wall time of the merge.
        report: the compatibility report the merge was checked with.
        device: the device the optimizer ran on (e.g. `cpu`, `cuda:0`).
        base: the base model of the PEFT adapters among the ingredients, if any.
        bytes_read: tensor bytes this process read from the inputs (each once, within `max_memory`).
        recorded_at: where the output is meant to live when it is written elsewhere first and moved (tune's
            pick): local references are recorded relative to it (default: `path`).
    """

    path: Path
    config: AmeConfig
    ingredients: list[Ingredient]
    order: list[list[int]]
    pivot: Any = "mean"
    seconds: float = 0.0
    report: CompatibilityReport | None = field(default=None, compare=False, repr=False)
    device: str = field(default="cpu", compare=False)
    base: Ingredient | None = None
    bytes_read: int = field(default=0, compare=False)
    recorded_at: Path | None = field(default=None, compare=False)

    @property
    def home(self) -> Path:
        """The folder local references are recorded relative to (`recorded_at`, else `path`)."""
        return Path(self.recorded_at) if self.recorded_at is not None else Path(self.path)


class PushInfo(str):
    """What a push did: the URL to show, the commit now at the head, and whether it changed anything.

    It is also the URL itself (a `str`, as huggingface_hub's `RepoUrl` is), so code that printed or tested the
    URL `push_to_hub` used to return keeps working. Keyword-only and read-only, like the other records.

    Attributes:
        url: the repo's URL (or the pull request's).
        commit: the commit now at the head of the target branch.
        changed: False when the Hub already held exactly this output (nothing was committed).
    """

    url: str
    commit: str | None
    changed: bool

    def __new__(cls, *, url: str, commit: str | None, changed: bool) -> "PushInfo":
        info = super().__new__(cls, url)
        for name, value in (("url", url), ("commit", commit), ("changed", changed)):
            object.__setattr__(info, name, value)
        return info

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"PushInfo is read-only (cannot set {name})")

    def __getnewargs_ex__(self) -> tuple[tuple, dict[str, Any]]:
        return (), {"url": self.url, "commit": self.commit, "changed": self.changed}

    def __repr__(self) -> str:
        return f"PushInfo(url={self.url!r}, commit={self.commit!r}, changed={self.changed!r})"


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Scores of models on one labelled data set: `scores` is `[(model, value)]` in the given order."""

    task: str
    metric: str
    dataset: str
    scores: list[tuple[str, float]]
