"""Push a merge output to the Hub: create the repo (and branch), upload the folder with its card,
and say whether anything changed; a failed push keeps the output and says how to retry."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from ._hub_errors import hub_errors, offline
from ._model_files import WEIGHT_PATTERNS
from .errors import HubError, InvalidConfigError, PushError
from .records import PushInfo
from .resolve import is_repo_id


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
    """Create the repo if needed and upload a merge output folder.

    Returns:
        A `PushInfo`: the URL to show, the commit now at the head, and whether the Hub already had exactly these
        files (then nothing is committed).

    Raises:
        PushError: the upload failed; the local folder is untouched and the message says how to retry.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    retry = retry_command(folder, repo_id, private=private, revision=revision, create_pr=create_pr)
    if "/" not in repo_id or not is_repo_id(repo_id):
        raise InvalidConfigError(f"--repo-id {repo_id!r} is not a repo ID of the form org/name")
    if not (folder / "ame_config.yaml").is_file():
        raise InvalidConfigError(f"{folder} is not an ame-hf merge output (no ame_config.yaml)")
    if offline():
        raise PushError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it and retry with `{retry}`", repo_id=repo_id)
    api = HfApi(token=token)
    try:
        with hub_errors(f"push to {repo_id}", repo_id, revision):
            from huggingface_hub import get_token

            if not (token or get_token()):
                raise HubError(f"push to {repo_id}: no Hub token; pass --token, set HF_TOKEN or run `hf auth login`", repo_id=repo_id)
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            head = api.repo_info(repo_id, revision=revision).sha
            info = api.upload_folder(
                repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr or None,
                commit_message=commit_message or "Upload AME merge (ame-hf)",
                # The output is the whole model: weights and indexes it does not have (an earlier push's
                # single file beside a new sharded index) are deleted, or transformers could load them.
                delete_patterns=[*WEIGHT_PATTERNS, "*.index.json"],
            )
    except HubError as err:
        raise PushError(f"{err} — the output in {folder} is intact; retry with `{retry}`", repo_id=repo_id) from err
    changed = bool(getattr(info, "pr_url", None)) or info.oid != head
    return PushInfo(url=str(getattr(info, "pr_url", None) or getattr(url, "url", None) or url),
                    commit=info.oid, changed=changed)


def retry_command(folder: Path, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                  create_pr: bool = False) -> str:
    """The `ame-hf push` command that retries a failed push with the same target."""
    args = ["ame-hf", "push", str(folder), "--repo-id", repo_id]
    args += ["--private"] if private else []
    args += ["--revision", revision] if revision else []
    args += ["--create-pr"] if create_pr else []
    return shlex.join(args)
