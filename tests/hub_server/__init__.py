"""A local Hugging Face Hub-compatible HTTP server for tests, built on the standard library only.
The real `huggingface_hub` client (Xet disabled) talks to it through HF_ENDPOINT: repos, commits, LFS, downloads.

Modules, each importing only those below it: server (HubServer) -> routes (URL table) -> reads, writes (endpoints)
-> auth (tokens, visibility) -> transport (HTTP/1.1 plumbing, RequestRecord) -> lfs -> storage (repos on disk);
errors (HubError) is shared by all.
"""

from __future__ import annotations

from .server import HubServer
from .transport import RequestRecord

__all__ = ["HubServer", "RequestRecord"]
