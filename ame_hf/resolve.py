"""Resolve ingredient references: an existing local directory as it is, a Hub repo ID
(`org/name[@revision]`) pinned to its commit sha with its file list, before anything is downloaded
(`fetch` downloads). A local typo fails without network, torch or the Hub client."""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Sequence

from ._hub_errors import hub_errors, offline
from .errors import IngredientNotFoundError
from .records import HubSource, Ingredient

logger = logging.getLogger(__name__)



def is_repo_id(text: str) -> bool:
    """True for a valid Hub repo ID (`name` or `org/name`), as huggingface_hub itself decides."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def split_ref(ref: str) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"). The revision may itself contain `/` (refs/pr/1)."""
    repo_id, sep, revision = str(ref).partition("@")
    return repo_id, (revision if sep else None)


def looks_like_path(ref: str) -> bool:
    text = str(ref)
    return text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1) or (
        os.altsep is not None and os.altsep in text
    )


def plan_refs(refs: Sequence[str | os.PathLike], *, token: str | None = None) -> list[Ingredient | HubSource]:
    """Check every reference before anything is downloaded (so a typo in the last one fails at once):
    a local directory becomes an `Ingredient`, a Hub repo ID a `HubSource` pinned to its commit sha."""
    return [_plan(os.fspath(ref), token) for ref in refs]


def local_path(ref: str | os.PathLike) -> Path | None:
    """The local model directory a reference names, or None when it is a Hub repo ID.

    Needs no network and no torch, so a typo fails at once. A reference that looks like a path
    (`./x`, `/x`, `a/b/c`), or whose first part is an existing local directory (`ame-demo/expert-cont`
    beside `ame-demo/`), is local: when it does not exist that is an error listing close matches.

    Raises:
        IngredientNotFoundError: a local path that does not exist, or a file instead of a directory.
    """
    text = os.fspath(ref)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise IngredientNotFoundError(f"{text}: is a file; give the model directory that contains it", ref=text)
    first = Path(text.split("/", 1)[0]).expanduser()
    if looks_like_path(text) or ("/" in text and first.is_dir()):
        raise IngredientNotFoundError(f"{text}: no such local directory{_close_matches(local)}", ref=text)
    return None


def rebase_ref(ref: str, base: Path) -> str:
    """A reference read from a YAML file in `base`: relative local paths are relative to that file's
    directory (so `--config merged/ame_config.yaml` works from anywhere); Hub repo IDs are kept."""
    text = str(ref)
    if os.path.isabs(os.path.expanduser(text)):
        return text
    joined = base / text
    if looks_like_path(text) or joined.exists() or ("/" in text and (base / text.split("/", 1)[0]).is_dir()):
        return os.path.normpath(joined)
    return text


def local_inputs(refs: Sequence[str | os.PathLike]) -> list[Path]:
    """The local directories among `refs` (each checked as `local_path` does); Hub repo IDs are skipped."""
    return [p for p in (local_path(r) for r in refs) if p is not None]


def _close_matches(missing: Path) -> str:
    parent = missing.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    try:
        names = sorted(p.name for p in parent.iterdir() if p.is_dir())
    except OSError:
        return ""
    wanted = missing.relative_to(parent).parts[0] if missing.is_relative_to(parent) else missing.name
    close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.8)
    shown = ", ".join(str(parent / c) if str(parent) != "." else c for c in close)
    return f" (did you mean {shown}?)" if close else ""


def _plan(text: str, token: str | None) -> Ingredient | HubSource:
    local = local_path(text)
    if local is not None:
        return Ingredient(ref=text, path=local)
    repo_id, revision = split_ref(text)
    if not is_repo_id(repo_id) or (revision is not None and not revision):
        raise IngredientNotFoundError(
            f"{text}: no such local directory (and not a Hub repo ID of the form org/name[@revision])", ref=text
        )
    if offline():
        return HubSource(ref=text, repo_id=repo_id, revision=revision)
    from huggingface_hub import HfApi, constants

    with hub_errors(text, repo_id, revision):
        # Bounded like the client's own metadata calls: an endpoint that accepts but never answers must fail.
        info = HfApi().model_info(repo_id, revision=revision, token=token, files_metadata=True,
                                  timeout=constants.HF_HUB_ETAG_TIMEOUT)
    files = {s.rfilename: s.size for s in (info.siblings or [])}
    return HubSource(ref=text, repo_id=repo_id, revision=revision, sha=info.sha, files=files)


