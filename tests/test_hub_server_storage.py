"""hub_server.storage on its own, without HTTP: blobs, repo creation, commits, and how revisions resolve
(branches, tags, refs/heads|tags|pr/..., full commit ids and unique prefixes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hub_server.storage import DEFAULT_GITATTRIBUTES, Repo, Store, git_blob_oid, valid_repo_path


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "hub")


@pytest.fixture
def repo(store: Store) -> Repo:
    repo = store.repo("model", "user/r")
    store.create_repo(repo, private=False)
    return repo


def add_file(store: Store, repo: Repo, parent: str, path: str, data: bytes, summary: str) -> str:
    files = dict(store.commit(repo, parent)["files"])
    files[path] = Store.file_entry(store.put_bytes(data), len(data), git_blob_oid(data), lfs=False)
    return store.write_commit(repo, parent, files, summary, "", "user")


def test_blobs_are_content_addressed_and_stored_once(store: Store) -> None:
    sha = store.put_bytes(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert store.put_bytes(b"hello") == sha
    assert store.read_blob(sha) == b"hello" and store.blob_size(sha) == 5
    assert store.blob_size("0" * 64) is None
    assert list((store.root / "tmp").iterdir()) == []  # nothing left half-written


def test_git_blob_oid_matches_git() -> None:
    assert git_blob_oid(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # `git hash-object /dev/null`


def test_new_repo_has_the_hubs_initial_commit(store: Store, repo: Repo) -> None:
    meta = store.meta(repo)
    assert meta is not None and meta["private"] is False
    refs = store.refs(repo)
    assert list(refs["branches"]) == ["main"] and refs["tags"] == refs["prs"] == {}
    commit = store.commit(repo, refs["branches"]["main"])
    assert (commit["summary"], commit["parent"]) == ("initial commit", None)
    assert store.read_blob(commit["files"][".gitattributes"]["sha256"]).decode() == DEFAULT_GITATTRIBUTES
    assert store.meta(store.repo("model", "user/missing")) is None
    assert store.repo("dataset", "user/r").url_path == "datasets/user/r" and repo.namespace == "user"


def test_resolve_branches_tags_prs_and_commit_ids(store: Store, repo: Repo) -> None:
    initial = store.resolve(repo, "main")
    assert initial is not None
    first = add_file(store, repo, initial, "a.txt", b"v1", "v1")
    second = add_file(store, repo, first, "a.txt", b"v2", "v2")
    proposal = add_file(store, repo, first, "a.txt", b"pr", "proposal")
    refs = store.refs(repo)
    refs["branches"].update(main=second, dev=first)
    refs["tags"]["v1.0"] = first
    refs["prs"]["1"] = proposal
    store.save_refs(repo, refs)

    expected = {"main": second, "refs/heads/main": second, "dev": first, "refs/heads/dev": first,
                "v1.0": first, "refs/tags/v1.0": first, "refs/pr/1": proposal, first: first, second[:7]: second}
    for revision, cid in expected.items():
        assert store.resolve(repo, revision) == cid, revision
    for revision in ("nope", "refs/heads/v1.0", "refs/tags/main", "refs/pr/2", "0" * 40, "abc123", "deadbeef"):
        assert store.resolve(repo, revision) is None, revision
    assert [c["summary"] for c in store.history(repo, second)] == ["v2", "v1", "initial commit"]
    assert store.read_blob(store.commit(repo, proposal)["files"]["a.txt"]["sha256"]) == b"pr"


def test_commit_prefix_must_be_unique_and_seven_digits_long(store: Store, repo: Repo) -> None:
    initial = store.resolve(repo, "main")
    assert initial is not None
    commit = store.commit(repo, initial)
    # Two commits whose ids share 7 digits (resolve only looks at the ids on disk).
    twins = ["abcdef1" + "0" * 33, "abcdef1" + "1" * 33]
    for cid in twins:
        store.commit_path(repo, cid).write_text(json.dumps({**commit, "id": cid}))
    assert store.resolve(repo, "abcdef1") is None  # ambiguous
    assert store.resolve(repo, "abcdef10") == twins[0] and store.resolve(repo, "abcdef11") == twins[1]
    assert store.resolve(repo, twins[1]) == twins[1]
    assert store.resolve(repo, initial[:7]) == initial
    assert store.resolve(repo, initial[:6]) is None  # under 7 digits is never a commit prefix


def test_valid_repo_paths() -> None:
    assert valid_repo_path("a/b.txt") and valid_repo_path(".gitattributes")
    for path in ("", "/a", "a//b", "a/../b", "./a", ".git/config", "a/"):
        assert not valid_repo_path(path), path
