"""Partial downloads from tests/hub_server: HTTP Range answers 206 with just the asked bytes, and the request log's
bytes_sent shows what a header-only read (safetensors metadata, HfFileSystem) really transferred."""

from __future__ import annotations

import struct
import urllib.request
import uuid

import numpy as np
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, HfFileSystem, get_safetensors_metadata
from safetensors.numpy import save

import hub_server
from hub_server import HubServer, RequestRecord


@pytest.fixture(scope="module")
def weights() -> bytes:
    return save({"w": np.arange(60_000, dtype=np.float32)}, metadata={"stamp": "ame"})  # ~240 KB


@pytest.fixture(scope="module")
def repo_id(hub_token: str, weights: bytes) -> str:
    rid = f"user/ranges-{uuid.uuid4().hex[:10]}"
    api = HfApi(token=hub_token)
    api.create_repo(rid)
    api.create_commit(rid, [CommitOperationAdd("model.safetensors", weights)], commit_message="weights")
    return rid


def downloads(hub: HubServer, first: int, repo_id: str) -> list[RequestRecord]:
    return [r for r in hub.requests[first:] if r.method == "GET" and f"/{repo_id}/resolve/" in r.path]


def test_public_names() -> None:
    assert hub_server.__all__ == ["HubServer", "RequestRecord"]


def test_raw_range_request_gets_206_and_only_those_bytes(hub: HubServer, repo_id: str, weights: bytes) -> None:
    first = len(hub.requests)
    request = urllib.request.Request(f"{hub.url}/{repo_id}/resolve/main/model.safetensors",
                                     headers={"Range": "bytes=0-7"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 0-7/{len(weights)}"
        assert response.read() == weights[:8]
    with urllib.request.urlopen(f"{hub.url}/{repo_id}/resolve/main/model.safetensors", timeout=5) as response:
        assert (response.status, response.headers["Accept-Ranges"]) == (200, "bytes")
        assert response.read() == weights
    assert [(r.status, r.bytes_sent) for r in downloads(hub, first, repo_id)] == [(206, 8), (200, len(weights))]
    head = urllib.request.Request(f"{hub.url}/{repo_id}/resolve/main/model.safetensors", method="HEAD")
    seen = len(hub.requests)
    with urllib.request.urlopen(head, timeout=5):
        pass
    # Only this repo's records: other tests' servers and processes share the Hub and log requests too.
    mine = [r for r in hub.requests[seen:] if f"/{repo_id}/" in r.path]
    assert [(r.method, r.path, r.status, r.bytes_sent) for r in mine] == [
        ("HEAD", f"/{repo_id}/resolve/main/model.safetensors", 200, 0)]


def test_hf_file_system_reads_eight_bytes_with_one_range(hub: HubServer, repo_id: str, weights: bytes) -> None:
    first = len(hub.requests)
    with HfFileSystem(skip_instance_cache=True).open(f"{repo_id}/model.safetensors", "rb",
                                                     cache_type="none") as file:
        head = file.read(8)
    assert head == weights[:8]
    assert [(r.status, r.bytes_sent) for r in downloads(hub, first, repo_id)] == [(206, 8)]


def test_safetensors_metadata_reads_the_header_not_the_weights(hub: HubServer, repo_id: str,
                                                               weights: bytes) -> None:
    first = len(hub.requests)
    metadata = get_safetensors_metadata(repo_id)
    info = metadata.files_metadata["model.safetensors"]
    assert info.metadata == {"stamp": "ame"} and info.tensors["w"].shape == [60_000]
    gets = downloads(hub, first, repo_id)
    assert gets and all(r.status == 206 for r in gets)
    header_size = 8 + struct.unpack("<Q", weights[:8])[0]
    assert header_size <= sum(r.bytes_sent for r in gets) < len(weights)
