"""hub_server.lfs on its own, without HTTP: which files go LFS, pointer files, and batch/upload of LFS objects
verified by sha256 and size before they reach the store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hub_server.errors import HubError
from hub_server.lfs import LFS_PATH, LFS_SIZE_THRESHOLD, LfsUploads, is_lfs, lfs_patterns, lfs_pointer
from hub_server.storage import DEFAULT_GITATTRIBUTES, Store

BASE_URL = "http://127.0.0.1:1"


@pytest.fixture
def uploads(tmp_path: Path) -> LfsUploads:
    return LfsUploads(Store(tmp_path / "hub"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pointer_file_is_the_git_lfs_spec_v1() -> None:
    oid = sha256(b"x")
    expected = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize 1\n".encode()
    assert lfs_pointer(oid, 1) == expected and len(expected) == 126


def test_upload_mode_follows_the_hubs_rules() -> None:
    patterns = lfs_patterns(DEFAULT_GITATTRIBUTES)
    assert "*.safetensors" in patterns and "saved_model/**/*" in patterns
    assert lfs_patterns("# comment\n\n*.txt text\n*.bin filter=lfs -text\n") == ["*.bin"]
    assert is_lfs("model.safetensors", 10, b"{}", patterns)  # tracked by .gitattributes, whatever its size
    assert is_lfs("sub/dir/weights.bin", 10, b"text", patterns)  # patterns without "/" match the basename
    assert is_lfs("saved_model/a/b.txt", 10, b"text", patterns)
    assert is_lfs("data.txt", 10, b"a\0b", patterns)  # binary sample
    assert is_lfs("big.txt", LFS_SIZE_THRESHOLD, b"text", patterns)  # too big for a regular file
    assert not is_lfs("big.txt", LFS_SIZE_THRESHOLD - 1, b"text", patterns)
    assert not is_lfs("config.json", 10, b"{}", patterns)
    assert not is_lfs("config.json", 10, b"{}", [])


def test_batch_announces_new_objects_and_skips_stored_ones(uploads: LfsUploads) -> None:
    stored = uploads.store.put_bytes(b"already here")
    new = sha256(b"new object")
    answer = uploads.batch([{"oid": stored, "size": 12}, {"oid": new, "size": 10}, {"oid": "XYZ", "size": 1},
                            {"oid": new, "size": -1}], BASE_URL)
    assert answer[0] == {"oid": stored, "size": 12}  # no actions: the client skips the upload
    assert answer[1]["actions"]["upload"]["href"] == f"{BASE_URL}/{LFS_PATH}/{new}"
    assert [a["error"]["code"] for a in answer[2:]] == [422, 422]
    assert uploads.pending == {new: 10}
    # A stored oid with another size is not "already stored": it must be uploaded (and will fail verification).
    assert "actions" in uploads.batch([{"oid": stored, "size": 13}], BASE_URL)[0]


def test_receive_verifies_sha256_and_size_then_stores(uploads: LfsUploads) -> None:
    data = b"\0weights" * 1000
    oid = sha256(data)
    uploads.batch([{"oid": oid, "size": len(data)}], BASE_URL)
    uploads.receive(oid, [data[:100], data[100:]])
    assert uploads.store.read_blob(oid) == data
    uploads.receive(oid, [data])  # identical files in one commit are PUT once each: still accepted
    assert list((uploads.store.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("body", [b"\0weights" * 999 + b"\0weightz", b"\0weights" * 999])
def test_receive_refuses_content_that_does_not_match(uploads: LfsUploads, body: bytes) -> None:
    data = b"\0weights" * 1000
    oid = sha256(data)
    uploads.batch([{"oid": oid, "size": len(data)}], BASE_URL)
    with pytest.raises(HubError) as excinfo:
        uploads.receive(oid, [body])
    assert excinfo.value.status == 400
    assert uploads.store.blob_size(oid) is None
    assert list((uploads.store.root / "tmp").iterdir()) == []


def test_receive_refuses_unannounced_objects_after_reading_them(uploads: LfsUploads) -> None:
    data = b"never announced"
    read: list[bytes] = []

    def body() -> object:
        for chunk in (data[:5], data[5:]):
            read.append(chunk)
            yield chunk

    with pytest.raises(HubError) as excinfo:
        uploads.receive(sha256(data), body())  # type: ignore[arg-type]
    assert excinfo.value.status == 403
    assert b"".join(read) == data  # the whole body was consumed: the keep-alive connection stays in step
    assert uploads.store.blob_size(sha256(data)) is None
