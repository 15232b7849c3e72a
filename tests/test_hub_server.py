"""tests/hub_server/ driven by the real huggingface_hub client (raw HTTP where the client hides details): repos,
commits with inline and LFS files, branches, tags and PRs, downloads by any revision, error classes, auth, lifecycle."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_server import HubServer

BIG_SIZE = 10 * 1024 * 1024 + 4321  # above the Hub's 10 MB limit for non-LFS files


@pytest.fixture(autouse=True)
def no_server_bugs(hub: HubServer) -> Iterator[None]:
    """Any exception inside the server (a bug there, not a client error) fails the test that caused it."""
    before = len(hub.errors)
    yield
    assert hub.errors[before:] == []


@pytest.fixture
def api(hub_token: str) -> HfApi:
    return HfApi(token=hub_token)


def new_repo_id(namespace: str = "user") -> str:
    return f"{namespace}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def repo_id(api: HfApi) -> str:
    rid = new_repo_id()
    api.create_repo(rid)
    return rid


def tree_bytes(root: str | Path) -> dict[str, bytes]:
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def status_of(excinfo: pytest.ExceptionInfo[HfHubHTTPError]) -> int:
    return excinfo.value.response.status_code


@contextmanager
def answered_fast(hub: HubServer, limit: float = 5.0) -> Iterator[None]:
    """The block ends in well under 5 s and the server answered no 5xx (the client retries those for ~23 s)."""
    first = len(hub.requests)
    start = time.monotonic()
    yield
    assert time.monotonic() - start < limit
    assert [r for r in hub.requests[first:] if r.status >= 500] == []


def test_client_talks_to_the_local_hub(hub: HubServer) -> None:
    assert constants.ENDPOINT == hub.url
    assert os.environ["HF_HUB_DISABLE_XET"] == "1"


def test_create_repo_and_exist_ok(api: HfApi, hub: HubServer) -> None:
    rid = new_repo_id("org")
    url = api.create_repo(rid)
    assert url.repo_id == rid and url == f"{hub.url}/{rid}"
    for _ in range(2):
        assert api.create_repo(rid, exist_ok=True).repo_id == rid
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(rid)
    assert status_of(excinfo) == 409

    info = api.model_info(rid)
    assert re.fullmatch(r"[0-9a-f]{40}", info.sha or "")
    assert [s.rfilename for s in info.siblings or []] == [".gitattributes"]  # the Hub's "initial commit"
    assert info.private is False


def test_upload_folder_with_lfs_and_regular_files_then_download(api: HfApi, hub: HubServer, repo_id: str,
                                                                 tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "tokenizer").mkdir(parents=True)
    files = {
        "config.json": json.dumps({"model_type": "bert", "hidden_size": 8}).encode(),
        "README.md": b"---\nlicense: apache-2.0\n---\n# A model\n",
        "tokenizer/vocab.txt": b"[PAD]\n[UNK]\nhello\n",
        "weights.bin": b"\0" + os.urandom(BIG_SIZE - 1),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)

    first = len(hub.requests)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder)
    calls = [(r.method, r.path.split("?")[0]) for r in hub.requests[first:]]
    assert ("POST", "/api/validate-yaml") in calls  # README.md metadata check
    assert ("POST", f"/{repo_id}.git/info/lfs/objects/batch") in calls
    assert [path for method, path in calls if method == "PUT"] == [
        f"/_hub_server/lfs/{hashlib.sha256(files['weights.bin']).hexdigest()}"]  # only the big file went LFS
    assert ("POST", f"/api/models/{repo_id}/commit/main") in calls

    assert api.model_info(repo_id).sha == commit.oid
    snapshot = tree_bytes(snapshot_download(repo_id))
    assert snapshot.pop(".gitattributes").startswith(b"*.7z filter=lfs")
    assert snapshot == files
    assert Path(hf_hub_download(repo_id, "tokenizer/vocab.txt")).read_bytes() == files["tokenizer/vocab.txt"]

    entries = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True)}
    assert entries["weights.bin"].lfs.sha256 == hashlib.sha256(files["weights.bin"]).hexdigest()
    assert entries["config.json"].lfs is None and entries["tokenizer"].tree_id

    # Unchanged files are recognised through the preupload oids: no new commit.
    again = api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert again.oid == commit.oid == api.model_info(repo_id).sha


def test_downloads_by_branch_tag_and_full_sha(api: HfApi, repo_id: str, tmp_path: Path) -> None:
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=repo_id)
    api.create_tag(repo_id, tag="v1.0")
    api.create_branch(repo_id, branch="dev")
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="a.txt", repo_id=repo_id, revision="dev")
    api.upload_file(path_or_fileobj=b"dev only", path_in_repo="extra.txt", repo_id=repo_id, revision="dev")
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id=repo_id)  # main moves on

    expected = {"main": b"v2", "dev": b"dev", "v1.0": b"v1", first.oid: b"v1", "refs/heads/dev": b"dev"}
    for revision, content in expected.items():
        snapshot = tree_bytes(snapshot_download(repo_id, revision=revision, cache_dir=tmp_path / "cache"))
        assert snapshot["a.txt"] == content, revision
        assert ("extra.txt" in snapshot) == (content == b"dev"), revision
        path = hf_hub_download(repo_id, "a.txt", revision=revision, cache_dir=tmp_path / "single")
        assert Path(path).read_bytes() == content, revision

    refs = api.list_repo_refs(repo_id)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0", first.oid)]
    assert api.model_info(repo_id, revision="v1.0").sha == first.oid
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_branch(repo_id, branch="dev")
    assert status_of(excinfo) == 409
    api.create_branch(repo_id, branch="dev", exist_ok=True)


def test_create_pr_commits_to_a_pr_ref(api: HfApi, hub: HubServer, repo_id: str) -> None:
    api.upload_file(path_or_fileobj=b"base", path_in_repo="a.txt", repo_id=repo_id)
    pr = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="a.txt", repo_id=repo_id, create_pr=True)
    assert (pr.pr_revision, pr.pr_num) == ("refs/pr/1", 1)
    assert pr.pr_url == f"{hub.url}/{repo_id}/discussions/1"
    assert Path(hf_hub_download(repo_id, "a.txt", revision="refs/pr/1")).read_bytes() == b"proposal"
    assert Path(hf_hub_download(repo_id, "a.txt")).read_bytes() == b"base"

    # Pushing to an open PR updates it; a read-only token may open PRs, as on the Hub.
    api.upload_file(path_or_fileobj=b"revised", path_in_repo="a.txt", repo_id=repo_id, revision="refs/pr/1")
    assert Path(hf_hub_download(repo_id, "a.txt", revision="refs/pr/1")).read_bytes() == b"revised"
    second = HfApi(token="hf_read_token").create_commit(
        repo_id, [CommitOperationAdd("b.txt", b"from a reader")], commit_message="suggest", create_pr=True)
    assert second.pr_revision == "refs/pr/2"
    prs = api.list_repo_refs(repo_id, include_pull_requests=True).pull_requests or []
    assert sorted(p.ref for p in prs) == ["refs/pr/1", "refs/pr/2"]


def test_missing_repo_entry_and_revision_raise_the_client_errors(hub: HubServer, api: HfApi, repo_id: str,
                                                                 tmp_path: Path) -> None:
    missing = new_repo_id()
    with answered_fast(hub):
        for call in (lambda: api.model_info(missing), lambda: hf_hub_download(missing, "config.json"),
                     lambda: snapshot_download(missing, cache_dir=tmp_path)):
            with pytest.raises(RepositoryNotFoundError):
                call()
    with answered_fast(hub), pytest.raises(RemoteEntryNotFoundError) as excinfo:
        hf_hub_download(repo_id, "no/such/file.txt")
    assert isinstance(excinfo.value, EntryNotFoundError)
    with answered_fast(hub):
        for call in (lambda: hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch"),
                     lambda: snapshot_download(repo_id, revision="no-such-branch", cache_dir=tmp_path),
                     lambda: api.model_info(repo_id, revision="0" * 40)):
            with pytest.raises(RevisionNotFoundError):
                call()


def test_unknown_token_is_a_401(hub: HubServer, repo_id: str) -> None:
    bad = HfApi(token="hf_not_a_real_token")
    with answered_fast(hub):
        for call in (lambda: bad.model_info(repo_id), lambda: bad.whoami(),
                     lambda: hf_hub_download(repo_id, ".gitattributes", token="hf_not_a_real_token")):
            with pytest.raises(HfHubHTTPError) as excinfo:
                call()
            assert status_of(excinfo) == 401
            assert not isinstance(excinfo.value, RepositoryNotFoundError)


def test_gated_repo_refuses_downloads(api: HfApi, hub: HubServer, repo_id: str, tmp_path: Path) -> None:
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
    hub.set_gated(repo_id, True)
    with answered_fast(hub):
        with pytest.raises(GatedRepoError):
            hf_hub_download(repo_id, "config.json", cache_dir=tmp_path)
        with pytest.raises(GatedRepoError):
            snapshot_download(repo_id, cache_dir=tmp_path, token=api.token)
    assert api.model_info(repo_id).gated == "auto"  # metadata stays visible, as on the Hub
    hub.set_gated(repo_id, False)
    assert Path(hf_hub_download(repo_id, "config.json", cache_dir=tmp_path)).read_bytes() == b"{}"


def test_writes_need_a_token_allowed_for_the_namespace(api: HfApi, hub: HubServer, repo_id: str) -> None:
    reader, anonymous = HfApi(token="hf_read_token"), HfApi(token=False)
    head = api.model_info(repo_id).sha
    forbidden = [
        lambda: reader.create_repo(new_repo_id("user")),
        lambda: api.create_repo(new_repo_id("someone-else")),
        lambda: reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id),
        lambda: reader.upload_file(path_or_fileobj=b"\0" * BIG_SIZE, path_in_repo="x.bin", repo_id=repo_id),
        lambda: reader.create_branch(repo_id, branch="b"),
        lambda: reader.create_tag(repo_id, tag="t"),
    ]
    unauthenticated = [
        lambda: anonymous.create_repo(new_repo_id("user")),
        lambda: anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id),
        lambda: anonymous.create_branch(repo_id, branch="b"),
    ]
    with answered_fast(hub):
        for expected, calls in ((403, forbidden), (401, unauthenticated)):
            for call in calls:
                with pytest.raises(HfHubHTTPError) as excinfo:
                    call()
                assert status_of(excinfo) == expected
    assert api.model_info(repo_id).sha == head
    assert {b.name for b in api.list_repo_refs(repo_id).branches} == {"main"}


def test_private_repo_is_invisible_without_a_namespace_token(api: HfApi, hub: HubServer, hub_token: str,
                                                             tmp_path: Path) -> None:
    rid = new_repo_id()
    api.create_repo(rid, private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=rid)
    with answered_fast(hub):
        for call in (lambda: HfApi(token=False).model_info(rid),
                     lambda: HfApi(token="hf_read_token").model_info(rid),
                     lambda: hf_hub_download(rid, "s.txt", cache_dir=tmp_path),
                     lambda: snapshot_download(rid, cache_dir=tmp_path)):
            with pytest.raises(RepositoryNotFoundError):
                call()
    assert api.model_info(rid).private is True
    assert Path(hf_hub_download(rid, "s.txt", token=hub_token, cache_dir=tmp_path)).read_bytes() == b"secret"


def test_whoami(api: HfApi) -> None:
    me = api.whoami()
    assert me["name"] == "user" and me["auth"]["accessToken"]["role"] == "write"
    assert [org["name"] for org in me["orgs"]] == ["org"]
    assert HfApi(token="hf_read_token").whoami()["auth"]["accessToken"]["role"] == "read"


def test_dataset_repos(api: HfApi, tmp_path: Path) -> None:
    rid = new_repo_id()
    url = api.create_repo(rid, repo_type="dataset")
    assert url.repo_type == "dataset"
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id=rid, repo_type="dataset")
    path = hf_hub_download(rid, "data.csv", repo_type="dataset", cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    with pytest.raises(RepositoryNotFoundError):  # same id, other repo type
        api.model_info(rid)


def test_transformers_autoconfig_from_the_hub(api: HfApi, repo_id: str) -> None:
    from transformers import AutoConfig, BertConfig

    config = BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    api.upload_file(path_or_fileobj=config.to_json_string().encode(), path_in_repo="config.json", repo_id=repo_id)
    loaded = AutoConfig.from_pretrained(repo_id)
    assert (loaded.model_type, loaded.hidden_size, loaded.vocab_size) == ("bert", 24, 50)


def test_resolve_headers_ranges_errors_and_keep_alive(api: HfApi, hub: HubServer, repo_id: str) -> None:
    text, blob = b"0123456789", b"\0binary" * 10
    commit = api.create_commit(repo_id, [CommitOperationAdd("t.txt", text), CommitOperationAdd("b.dat", blob)],
                               commit_message="two files")
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=5)

    def call(method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[http.client.HTTPResponse, bytes]:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()

    response, body = call("HEAD", f"/{repo_id}/resolve/main/t.txt")
    sock = conn.sock
    assert (response.status, body) == (200, b"")
    assert response.headers["X-Repo-Commit"] == commit.oid
    assert response.headers["ETag"] == f'"{hashlib.sha1(b"blob 10" + bytes(1) + text).hexdigest()}"'
    assert response.headers["Content-Length"] == "10"

    response, body = call("GET", f"/{repo_id}/resolve/refs%2Fheads%2Fmain/b.dat")  # binary sample -> LFS
    assert body == blob
    assert response.headers["X-Linked-Etag"] == f'"{hashlib.sha256(blob).hexdigest()}"'
    assert response.headers["X-Linked-Size"] == str(len(blob))

    response, body = call("GET", f"/{repo_id}/resolve/{commit.oid}/t.txt", headers={"Range": "bytes=2-5"})
    assert (response.status, body, response.headers["Content-Range"]) == (206, b"2345", "bytes 2-5/10")
    response, body = call("GET", f"/{repo_id}/resolve/main/t.txt", headers={"Range": "bytes=8-"})
    assert (response.status, body) == (206, b"89")
    response, _ = call("GET", f"/{repo_id}/resolve/main/t.txt", headers={"Range": "bytes=10-"})
    assert response.status == 416

    response, body = call("GET", f"/{repo_id}/resolve/main/nope.txt")
    assert (response.status, response.headers["X-Error-Code"]) == (404, "EntryNotFound")
    assert response.headers["X-Repo-Commit"] == commit.oid
    assert "nope.txt" in json.loads(body)["error"]
    # A refused request with a body: the body is drained, so the connection stays usable.
    response, body = call("POST", f"/api/models/{repo_id}/commit/main", body=b'{"key": "header"}\n' * 1000)
    assert response.status == 401 and json.loads(body)["error"]
    response, _ = call("GET", "/api/models/user/does-not-exist")
    assert (response.status, response.headers["X-Error-Code"]) == (404, "RepoNotFound")
    response, _ = call("GET", f"/{repo_id}/resolve/nope/t.txt")
    assert (response.status, response.headers["X-Error-Code"]) == (404, "RevisionNotFound")
    assert conn.sock is sock  # every answer above reused one keep-alive connection
    conn.close()


def test_server_stop_releases_port_and_keep_alive_sockets(tmp_path: Path) -> None:
    server = HubServer(tmp_path / "hub").start()  # tokens=None: any token writes anywhere
    api = HfApi(endpoint=server.url, token="whatever")
    api.create_repo("someone/r")
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="someone/r")
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(endpoint=server.url, token=False).create_repo("someone/r2")
    assert status_of(excinfo) == 401

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/api/models/someone/r")
    assert conn.getresponse().read()
    sock, port = conn.sock, server.port
    server.stop()
    server.stop()  # idempotent
    sock.settimeout(2)
    assert sock.recv(1) == b""  # the server closed the idle keep-alive connection
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert not [t for t in threading.enumerate() if t.name == f"HubServer:{port}"]

    with HubServer(tmp_path / "hub") as again:  # state persists on disk
        path = hf_hub_download("someone/r", "x.txt", endpoint=again.url, cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == b"x"


def test_small_keep_alive_answers_are_not_delayed(hub: HubServer, repo_id: str) -> None:
    # Headers and body go out in two writes; without TCP_NODELAY, Nagle + delayed ACK add ~40 ms to each answer.
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=5)
    start = time.monotonic()
    for _ in range(50):
        conn.request("GET", f"/{repo_id}/resolve/main/.gitattributes", headers={"Range": "bytes=0-3"})
        assert conn.getresponse().read() == b"*.7z"
    conn.close()
    assert time.monotonic() - start < 1.0


def test_identical_lfs_files_deletions_and_history(api: HfApi, repo_id: str, tmp_path: Path) -> None:
    weights = b"\0" + os.urandom(1000)
    api.create_commit(repo_id, [CommitOperationAdd("a/w.bin", weights), CommitOperationAdd("b/w.bin", weights),
                                CommitOperationAdd("b/keep.txt", b"keep")], commit_message="same bytes twice")
    assert tree_bytes(snapshot_download(repo_id, cache_dir=tmp_path / "1"))["b/w.bin"] == weights
    api.delete_file("a/w.bin", repo_id)
    api.delete_folder("b", repo_id)
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("a/w.bin", repo_id)
    titles = [c.title for c in api.list_repo_commits(repo_id)]
    assert titles[1:] == ["Delete a/w.bin with huggingface_hub", "same bytes twice", "initial commit"]
    assert titles[0].startswith("Delete folder b")
