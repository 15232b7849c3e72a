"""Git LFS for the test Hub: which files go LFS, pointer files, and the batch/upload/verify of LFS objects.
HTTP-free: routes hand in parsed batch requests and upload bodies, verified objects land in the Store."""

from __future__ import annotations

import hashlib
import re
from fnmatch import fnmatchcase
from typing import Any, Iterable

from .errors import HubError
from .storage import Store

__all__ = ["LFS_PATH", "LFS_SIZE_THRESHOLD", "SHA256", "LfsUploads", "is_lfs", "lfs_patterns", "lfs_pointer",
           "matches_gitattributes"]

# The Hub refuses non-LFS files above 10 MB; the client then uploads them through the LFS batch API.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_PATH = "_hub_server/lfs"  # URL path of the upload hrefs handed out by a batch call
SHA256 = re.compile(r"[0-9a-f]{64}")


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file git stores in place of an LFS object (its git blob id is the file's oid)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def lfs_patterns(gitattributes: str) -> list[str]:
    """The patterns of a .gitattributes text that carry `filter=lfs`."""
    return [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line and line.split()]


def matches_gitattributes(path: str, patterns: list[str]) -> bool:
    basename = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        # git matches patterns without a slash against the basename, others against the whole path.
        if "/" in pattern:
            if fnmatchcase(path, pattern.replace("**/", "*").replace("**", "*")):
                return True
        elif fnmatchcase(basename, pattern):
            return True
    return False


def is_lfs(path: str, size: int, sample: bytes, patterns: list[str]) -> bool:
    """The Hub's rules for the preupload answer: big, binary (NUL byte in the first 512 bytes) or tracked -> LFS."""
    return size >= LFS_SIZE_THRESHOLD or b"\0" in sample or matches_gitattributes(path, patterns)


class LfsUploads:
    """LFS objects announced by batch calls and received by upload PUTs, verified against their sha256 and size."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pending: dict[str, int] = {}  # oid -> size announced by an LFS batch call

    def batch(self, objects: Iterable[Any], base_url: str) -> list[dict[str, Any]]:
        """The `objects` of a batch answer: an upload action for new objects, none for stored ones."""
        answer: list[dict[str, Any]] = []
        for obj in objects:
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not SHA256.fullmatch(oid) or not isinstance(size, int) or size < 0:
                answer.append({"oid": str(oid), "size": int(size or 0),
                               "error": {"code": 422, "message": "Invalid oid or size"}})
            elif self.store.blob_size(oid) == size:
                answer.append({"oid": oid, "size": size})  # no "actions": already stored, the client skips it
            else:
                self.pending[oid] = size
                href = f"{base_url}/{LFS_PATH}/{oid}"
                answer.append({"oid": oid, "size": size, "authenticated": True,
                               "actions": {"upload": {"href": href, "header": {}, "expires_in": 3600}}})
        return answer

    def receive(self, oid: str, chunks: Iterable[bytes]) -> None:
        """Store an uploaded object after reading all of `chunks`; HubError 403 if never announced, 400 if corrupt."""
        tmp = self.store.temp_path()
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as out:
                # The whole body is read before any refusal, so the keep-alive connection stays in step.
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            expected = self.pending.get(oid)
            if expected is None:
                raise HubError(403, f"No LFS upload was announced for {oid}")
            if digest.hexdigest() != oid or size != expected:
                raise HubError(400, f"Uploaded content does not match oid {oid} / size {expected}")
            # The announcement is kept: identical files in one commit share an oid and are PUT once each.
            self.store.adopt_blob(tmp, oid)
        finally:
            tmp.unlink(missing_ok=True)
