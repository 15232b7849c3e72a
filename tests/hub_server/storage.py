"""Repos on disk for the test Hub: content-addressed blobs, per-repo metadata, refs and immutable commits.
No HTTP here: routes call these methods, and unit tests can drive them directly."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

__all__ = ["DEFAULT_GITATTRIBUTES", "HEX40", "PR_REF", "URL_PREFIX", "Repo", "Store", "git_blob_oid", "now",
           "valid_repo_path"]

# Repo type -> prefix of its web/resolve URLs (as on huggingface.co).
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX_PREFIX = re.compile(r"[0-9a-f]{7,39}")
PR_REF = re.compile(r"refs/pr/(\d+)")

# What the real Hub writes in the "initial commit" of every new repo; its patterns also pick the LFS upload mode.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)


def now() -> str:
    """The current UTC time as the Hub writes it."""
    # huggingface_hub's parse_datetime expects exactly this shape: 2024-01-31T12:00:00.000Z
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    """The git blob id of `data` (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def valid_repo_path(path: str) -> bool:
    """A file path a commit may create: relative, no empty/./.. parts, nothing under .git/."""
    parts = path.split("/")
    return bool(path) and all(part not in ("", ".", "..") for part in parts) and parts[0] != ".git"


def _write_json_atomic(path: Path, data: Any) -> None:
    # Readers on other threads must never see a half-written refs or commit file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


@dataclass(frozen=True)
class Repo:
    type: str  # "model", "dataset" or "space"
    id: str  # "namespace/name"
    dir: Path

    @property
    def namespace(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def url_path(self) -> str:
        return URL_PREFIX[self.type] + self.id


class Store:
    """Repos on disk: blobs/<sha256> shared by all repos; per repo, repo.json, refs.json and commits/<id>.json.

    A commit lists path -> {sha256, size, oid (git blob id), lfs}; commits are immutable, so they are cached in memory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()  # serialises ref updates and repo creation
        self._commits: dict[tuple[Path, str], dict[str, Any]] = {}
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    # -- blobs --
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def blob_size(self, sha256: str) -> int | None:
        path = self.blob_path(sha256)
        return path.stat().st_size if path.is_file() else None

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self.blob_size(sha) != len(data):
            tmp = self.temp_path()
            tmp.write_bytes(data)
            self.adopt_blob(tmp, sha)
        return sha

    def temp_path(self) -> Path:
        return self.root / "tmp" / uuid.uuid4().hex

    def adopt_blob(self, tmp: Path, sha256: str) -> None:
        target = self.blob_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    # -- repos --
    def repo(self, repo_type: str, repo_id: str) -> Repo:
        return Repo(repo_type, repo_id, self.root / "repos" / f"{repo_type}s" / repo_id)

    def meta(self, repo: Repo) -> dict[str, Any] | None:
        try:
            return json.loads((repo.dir / "repo.json").read_text())
        except FileNotFoundError:
            return None

    def save_meta(self, repo: Repo, meta: dict[str, Any]) -> None:
        _write_json_atomic(repo.dir / "repo.json", meta)

    def create_repo(self, repo: Repo, private: bool) -> None:
        data = DEFAULT_GITATTRIBUTES.encode()
        files = {".gitattributes": self.file_entry(self.put_bytes(data), len(data), git_blob_oid(data), lfs=False)}
        cid = self.write_commit(repo, None, files, "initial commit", "", "system")
        _write_json_atomic(repo.dir / "refs.json", {"branches": {"main": cid}, "tags": {}, "prs": {}})
        self.save_meta(repo, {"_id": uuid.uuid4().hex[:24], "private": private, "createdAt": now()})

    def refs(self, repo: Repo) -> dict[str, dict[str, str]]:
        return json.loads((repo.dir / "refs.json").read_text())

    def save_refs(self, repo: Repo, refs: dict[str, dict[str, str]]) -> None:
        _write_json_atomic(repo.dir / "refs.json", refs)

    # -- commits --
    @staticmethod
    def file_entry(sha256: str, size: int, oid: str, lfs: bool) -> dict[str, Any]:
        return {"sha256": sha256, "size": size, "oid": oid, "lfs": lfs}

    def commit_path(self, repo: Repo, cid: str) -> Path:
        return repo.dir / "commits" / f"{cid}.json"

    def commit(self, repo: Repo, cid: str) -> dict[str, Any]:
        key = (repo.dir, cid)
        if key not in self._commits:
            self._commits[key] = json.loads(self.commit_path(repo, cid).read_text())
        return self._commits[key]

    def write_commit(
        self, repo: Repo, parent: str | None, files: dict[str, Any], summary: str, description: str, author: str
    ) -> str:
        date = now()
        # Unique even for identical content, like git commits with different timestamps.
        seed = json.dumps([parent, files, summary, description, date, uuid.uuid4().hex], sort_keys=True)
        cid = hashlib.sha1(seed.encode()).hexdigest()
        commit = {"id": cid, "parent": parent, "files": files, "summary": summary,
                  "description": description, "author": author, "date": date}
        _write_json_atomic(self.commit_path(repo, cid), commit)
        return cid

    def resolve(self, repo: Repo, revision: str) -> str | None:
        """Branch, tag, refs/heads|tags|pr/..., full commit id or unique commit-id prefix -> commit id."""
        refs = self.refs(repo)
        if revision.startswith("refs/heads/"):
            return refs["branches"].get(revision[len("refs/heads/"):])
        if revision.startswith("refs/tags/"):
            return refs["tags"].get(revision[len("refs/tags/"):])
        if match := PR_REF.fullmatch(revision):
            return refs["prs"].get(match[1])
        if revision in refs["branches"]:
            return refs["branches"][revision]
        if revision in refs["tags"]:
            return refs["tags"][revision]
        if HEX40.fullmatch(revision):
            return revision if self.commit_path(repo, revision).is_file() else None
        if _HEX_PREFIX.fullmatch(revision):
            matches = [p.stem for p in (repo.dir / "commits").glob(f"{revision}*.json")]
            return matches[0] if len(matches) == 1 else None
        return None

    def history(self, repo: Repo, cid: str) -> Iterator[dict[str, Any]]:
        current: str | None = cid
        while current is not None:
            commit = self.commit(repo, current)
            yield commit
            current = commit["parent"]
