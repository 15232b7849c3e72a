"""The test Hub's paths-info route (tests/hub_server/reads.py), reached through `HfApi.get_paths_info`: the
entries it gives are the ones the tree listing gives for the same paths, and a missing path is left out."""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, RepoFile, RepoFolder

from hub_server import HubServer


@pytest.fixture(autouse=True)
def no_server_bugs(hub: HubServer) -> Iterator[None]:
    before = len(hub.errors)
    yield
    assert hub.errors[before:] == []


@pytest.mark.parametrize("expand", [False, True])
def test_paths_info_agrees_with_the_tree(hub: HubServer, hub_token: str, expand: bool) -> None:
    api = HfApi(endpoint=hub.url, token=hub_token)
    repo_id = f"user/paths-{uuid.uuid4().hex[:10]}"
    api.create_repo(repo_id)
    api.create_commit(repo_id, [CommitOperationAdd("config.json", b"{}"), CommitOperationAdd("sub/a.txt", b"a")],
                      commit_message="first")
    api.create_commit(repo_id, [CommitOperationAdd("sub/b.txt", b"bb")], commit_message="second")

    first = len(hub.requests)
    found = api.get_paths_info(repo_id, ["sub", "config.json", "missing.txt", "sub/b.txt"], expand=expand)
    assert [(r.method, r.path.split("?")[0]) for r in hub.requests[first:]] == [
        ("POST", f"/api/models/{repo_id}/paths-info/main")]
    assert [(type(e), e.path) for e in found] == [(RepoFolder, "sub"), (RepoFile, "config.json"),
                                                  (RepoFile, "sub/b.txt")]
    tree = {e.path: e for e in api.list_repo_tree(repo_id, recursive=True, expand=expand)}
    for entry in found:
        assert entry == tree[entry.path], entry.path
    assert found[2].size == 2
    if expand:  # the commit that last changed each path
        assert [e.last_commit.title for e in found] == ["second", "first", "second"]
    else:
        assert all(e.last_commit is None for e in found)
