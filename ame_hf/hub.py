"""Everything that talks to the Hugging Face Hub: resolving ingredient references and pushing.

Knows nothing about optimizers; turns the client's exceptions into ame-hf's one-line errors.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .errors import AmeError, HubError, IngredientNotFoundError, InvalidConfigError, PushError

logger = logging.getLogger(__name__)

# What a merge needs from a model repo. `.bin` weights only when the repo has no safetensors.
WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
SIDE_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab*",
    "merges.txt", "added_tokens.json", "*.model", "preprocessor_config.json", "processor_config.json",
    "chat_template*", "image_processor*", "feature_extractor*",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
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


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


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
        raise IngredientNotFoundError(f"{text}: is a file; give the model directory that contains it")
    first = Path(text.split("/", 1)[0]).expanduser()
    if looks_like_path(text) or ("/" in text and first.is_dir()):
        raise IngredientNotFoundError(f"{text}: no such local directory{_close_matches(local)}")
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
    return f" (did you mean {shown}?)" if close else f" ({parent} holds no directory of that name)"


def _plan(text: str, token: str | None) -> Ingredient | tuple[str, str, str | None, str | None, list[str]]:
    """A local Ingredient, or (ref, repo_id, revision, sha, patterns) of a Hub repo to download."""
    local = local_path(text)
    if local is not None:
        return Ingredient(ref=text, path=local)
    repo_id, revision = split_ref(text)
    if looks_like_path(text) or not _REPO_ID.match(repo_id) or (revision is not None and not revision):
        raise IngredientNotFoundError(
            f"{text}: no such local directory (and not a Hub repo ID of the form org/name[@revision])"
        )
    if _offline():
        return text, repo_id, revision, None, []
    from huggingface_hub import HfApi

    with hub_errors(text, repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, token=token, files_metadata=False)
    files = [s.rfilename for s in (info.siblings or [])]
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    # README.md only to read the ingredient's license and pipeline tag for our card.
    patterns = (WEIGHT_PATTERNS if has_safetensors else BIN_PATTERNS) + SIDE_PATTERNS + ["README.md"]
    return text, repo_id, revision, info.sha, patterns


@contextmanager
def hub_errors(what: str, repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into one clear ame-hf error."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except AmeError:
        raise
    except hf_errors.GatedRepoError:
        raise HubError(
            f"{what}: {repo_id} is gated; accept its conditions on its Hub page, then pass a token "
            "with access (--token or HF_TOKEN)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise IngredientNotFoundError(
            f"{what}: revision {revision!r} does not exist in {repo_id}; check the branch, tag or commit"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise IngredientNotFoundError(
            f"{what}: repository {repo_id} not found on {endpoint()} (check the name; for a private "
            "repo pass --token or set HF_TOKEN)"
        ) from None
    except (hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError):
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        hint = ("HF_HUB_OFFLINE is set and it is not in the local cache; unset HF_HUB_OFFLINE"
                if offline else f"cannot reach {endpoint()}; check your connection or HF_ENDPOINT")
        raise HubError(f"{what}: {repo_id}: {hint}") from None
    except hf_errors.EntryNotFoundError as err:
        raise IngredientNotFoundError(f"{what}: a file is missing in {repo_id} ({_first_line(err)})") from None
    except hf_errors.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status == 401:
            raise HubError(
                f"{what}: the Hub refused the token (401 Unauthorized); check --token / HF_TOKEN "
                "or log in again with `hf auth login`"
            ) from None
        if status == 403:
            raise HubError(
                f"{what}: the token may not access {repo_id} (403 Forbidden); use a token with "
                "write access to that namespace"
            ) from None
        raise HubError(f"{what}: the Hub answered {status} for {repo_id} ({_first_line(err)})") from None
    except OSError as err:
        raise HubError(f"{what}: cannot reach {endpoint()} ({_first_line(err)}); check your connection or HF_ENDPOINT") from None
    except Exception as err:
        # httpx raises its own (non-OSError) exceptions when the endpoint cannot be reached.
        if type(err).__module__.split(".")[0] in ("httpx", "httpcore", "httpx2", "httpcore2"):
            raise HubError(
                f"{what}: cannot reach {endpoint()} ({type(err).__name__}); check your connection or HF_ENDPOINT"
            ) from None
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download(ref: str, repo_id: str, revision: str | None, sha: str | None, patterns: list[str], *,
              token: str | None, cache_dir: str | None) -> Ingredient:
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    with hub_errors(ref, repo_id, revision):
        if sha is None:
            # Offline: no API call possible. The cache maps the revision to a snapshot folder named
            # by its sha; we downloaded only some files, so ask for the folder, not a full snapshot.
            cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
            if not isinstance(cached, str):
                raise HubError(f"{ref}: {repo_id} is not in the local cache and HF_HUB_OFFLINE is set; "
                               "unset HF_HUB_OFFLINE to download it")
            path = Path(cached).parent
            return Ingredient(ref=ref, path=path, repo_id=repo_id, revision=revision,
                              sha=path.name if _SHA.match(path.name) else None)
        logger.info("downloading %s@%s", repo_id, sha)
        # Download the resolved sha, not the branch: what we record is exactly what we merge.
        path = Path(snapshot_download(repo_id, revision=sha, allow_patterns=patterns, token=token,
                                      cache_dir=cache_dir))
    _record_ref(path, revision, sha)
    return Ingredient(ref=ref, path=path, repo_id=repo_id, revision=revision, sha=sha)


def _record_ref(snapshot: Path, revision: str | None, sha: str) -> None:
    """Note in the Hub cache which commit the branch or tag pointed to, as the client does when it
    downloads by name, so that HF_HUB_OFFLINE=1 later finds `org/name[@branch]` in the cache."""
    name = revision or "main"
    if _SHA.match(name) or snapshot.parent.name != "snapshots":
        return
    ref_file = snapshot.parent.parent / "refs" / name
    try:
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(sha)
    except OSError as err:  # a read-only cache still works online
        logger.debug("cannot record %s -> %s in the cache: %s", name, sha, err)


@dataclass(frozen=True)
class PushInfo:
    """What a push did: the URL to show, the commit now at the head, and whether it changed anything."""

    url: str
    commit: str | None
    changed: bool


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> str:
    """Create the repo if needed and upload a merge output folder; return the URL to show.

    Raises:
        PushError: the upload failed; the local folder is untouched and the message says how to retry.
    """
    return upload_output(folder, repo_id, token=token, private=private, revision=revision, create_pr=create_pr,
                         commit_message=commit_message).url


def upload_output(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> PushInfo:
    """`push_folder`, telling also whether the Hub already had exactly these files (nothing committed)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    retry = retry_command(folder, repo_id, private=private, revision=revision, create_pr=create_pr)
    if not _REPO_ID.match(repo_id) or "/" not in repo_id:
        raise InvalidConfigError(f"--repo-id {repo_id!r} is not a repo ID of the form org/name")
    if not (folder / "ame_config.yaml").is_file():
        raise InvalidConfigError(f"{folder} is not an ame-hf merge output (no ame_config.yaml)")
    if _offline():
        raise PushError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it and retry with `{retry}`")
    api = HfApi(token=token)
    try:
        with hub_errors(f"push to {repo_id}", repo_id, revision):
            from huggingface_hub import get_token

            if not (token or get_token()):
                raise HubError(f"push to {repo_id}: no Hub token; pass --token, set HF_TOKEN or run `hf auth login`")
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            head = api.repo_info(repo_id, revision=revision).sha
            info = api.upload_folder(
                repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr or None,
                commit_message=commit_message or "Upload AME merge (ame-hf)",
            )
    except HubError as err:
        raise PushError(f"{err} — the output in {folder} is intact; retry with `{retry}`") from None
    changed = bool(getattr(info, "pr_url", None)) or info.oid != head
    return PushInfo(url=str(getattr(info, "pr_url", None) or getattr(url, "url", None) or url),
                    commit=info.oid, changed=changed)


def retry_command(folder: Path, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                  create_pr: bool = False) -> str:
    """The `ame-hf push` command that retries a failed push with the same target."""
    import shlex

    args = ["ame-hf", "push", str(folder), "--repo-id", repo_id]
    args += ["--private"] if private else []
    args += ["--revision", revision] if revision else []
    args += ["--create-pr"] if create_pr else []
    return shlex.join(args)
