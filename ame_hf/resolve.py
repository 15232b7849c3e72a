"""Resolve ingredient references to local directories: an existing directory as it is, a Hub repo ID
(`org/name[@revision]`) downloaded at its resolved commit sha. Every reference is checked before any
download; a local typo fails without network, torch or the Hub client."""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path
from typing import Sequence

from ._hub_errors import hub_errors, offline
from .errors import HubError, IngredientNotFoundError
from .records import Ingredient

logger = logging.getLogger(__name__)

# What a merge needs from a model repo. `.bin` weights only when the repo has no safetensors.
WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
SIDE_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab*",
    "merges.txt", "added_tokens.json", "*.model", "preprocessor_config.json", "processor_config.json",
    "chat_template*", "image_processor*", "feature_extractor*",
]

_SHA = re.compile(r"^[0-9a-f]{40}$")


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


def resolve_ref(ref: str | os.PathLike, *, token: str | None = None, cache_dir: str | None = None) -> Ingredient:
    """Turn a reference into a local directory: an existing directory, or a Hub repo downloaded.

    Args:
        ref: a local directory, or `org/name` with an optional `@revision` (branch, tag or sha).
        token: a Hub token; default `HF_TOKEN` or the login cache.
        cache_dir: the Hub cache (default: `HF_HOME`'s).

    Raises:
        IngredientNotFoundError: no such directory, repository or revision.
        HubError: the Hub refused the token, the repo is gated, or the Hub is unreachable.

    >>> resolve_ref("./my-finetune").path          # doctest: +SKIP
    >>> resolve_ref("org/model@v1").sha            # doctest: +SKIP
    """
    return resolve_refs([ref], token=token, cache_dir=cache_dir)[0]


def resolve_refs(refs: Sequence[str | os.PathLike], *, token: str | None = None,
                 cache_dir: str | None = None) -> list[Ingredient]:
    """Resolve several references: every one is checked (local path, repo, revision, access)
    before anything is downloaded, so a typo in the last one fails at once."""
    planned = [_plan(os.fspath(ref), token) for ref in refs]
    return [p if isinstance(p, Ingredient) else _download(*p, token=token, cache_dir=cache_dir) for p in planned]


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


def model_config(ref: str | os.PathLike, *, token: str | None = None) -> dict:
    """A reference's `config.json` as a dict, without its weights: read locally, or only that file
    fetched from the Hub (for checks that must fail before the download of a merge).

    Raises:
        IngredientNotFoundError, HubError: as `resolve_ref`; CheckpointError: no readable config.json.
    """
    import json

    from .errors import CheckpointError

    text = os.fspath(ref)
    local = local_path(text)
    if local is None:
        from huggingface_hub import hf_hub_download

        repo_id, revision = split_ref(text)
        with hub_errors(text, repo_id, revision):
            local = Path(hf_hub_download(repo_id, "config.json", revision=revision, token=token)).parent
    try:
        config = json.loads((local / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{text}: no readable config.json ({type(err).__name__}: {err})", path=local) from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{text}: config.json must hold a JSON object", path=local)
    return config


def _plan(text: str, token: str | None) -> Ingredient | tuple[str, str, str | None, str | None, list[str]]:
    """A local Ingredient, or (ref, repo_id, revision, sha, patterns) of a Hub repo to download."""
    local = local_path(text)
    if local is not None:
        return Ingredient(ref=text, path=local)
    repo_id, revision = split_ref(text)
    if not is_repo_id(repo_id) or (revision is not None and not revision):
        raise IngredientNotFoundError(
            f"{text}: no such local directory (and not a Hub repo ID of the form org/name[@revision])", ref=text
        )
    if offline():
        return text, repo_id, revision, None, []
    from huggingface_hub import HfApi

    with hub_errors(text, repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, token=token, files_metadata=False)
    files = [s.rfilename for s in (info.siblings or [])]
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    # README.md only to read the ingredient's license and pipeline tag for our card.
    patterns = (WEIGHT_PATTERNS if has_safetensors else BIN_PATTERNS) + SIDE_PATTERNS + ["README.md"]
    return text, repo_id, revision, info.sha, patterns


def _download(ref: str, repo_id: str, revision: str | None, sha: str | None, patterns: list[str], *,
              token: str | None, cache_dir: str | None) -> Ingredient:
    from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache

    with hub_errors(ref, repo_id, revision):
        if sha is None:
            # Offline: no API call possible. The cache maps the revision to a snapshot folder named
            # by its sha; we downloaded only some files, so ask for the folder, not a full snapshot.
            cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
            if not isinstance(cached, str):
                raise HubError(f"{ref}: {repo_id} is not in the local cache and HF_HUB_OFFLINE is set; "
                               "unset HF_HUB_OFFLINE to download it", repo_id=repo_id)
            path = Path(cached).parent
            return Ingredient(ref=ref, path=path, repo_id=repo_id, revision=revision,
                              sha=path.name if _SHA.match(path.name) else None)
        logger.info("downloading %s@%s", repo_id, sha)
        # Download the resolved sha, not the branch: what we record is exactly what we merge.
        path = Path(snapshot_download(repo_id, revision=sha, allow_patterns=patterns, token=token,
                                      cache_dir=cache_dir))
        if not _SHA.match(revision or "main"):
            # Let the client note in its cache which commit the branch or tag named, so that
            # HF_HUB_OFFLINE=1 later finds `org/name[@branch]`: config.json, already there, is not fetched again.
            hf_hub_download(repo_id, "config.json", revision=revision or "main", token=token, cache_dir=cache_dir)
    return Ingredient(ref=ref, path=path, repo_id=repo_id, revision=revision, sha=sha)
