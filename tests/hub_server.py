"""A local Hugging Face Hub-compatible HTTP server for tests, built on the standard library only.
The real `huggingface_hub` client (Xet disabled) talks to it through HF_ENDPOINT: repos, commits, LFS, downloads."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import socketserver
import sys
import tempfile
import threading
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, NamedTuple
from urllib.parse import parse_qs, unquote

__all__ = ["HubServer", "RequestRecord"]

# URL segment after /api/ -> repo type, and repo type -> prefix of its web/resolve URLs (as on huggingface.co).
_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# The Hub refuses non-LFS files above 10 MB; the client then uploads them through the LFS batch API.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_CHUNK = 1 << 20
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX_PREFIX = re.compile(r"[0-9a-f]{7,39}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_BRANCH = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
_PR_REF = re.compile(r"refs/pr/(\d+)")
_LFS_PATH = "_hub_server/lfs"

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


class RequestRecord(NamedTuple):
    """One handled request, kept so tests can check which endpoints the client really called."""

    method: str
    path: str
    status: int


class HubError(Exception):
    """A client error answered with the status, `X-Error-Code` and JSON body that huggingface_hub maps to its errors."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


def _now() -> str:
    # huggingface_hub's parse_datetime expects exactly this shape: 2024-01-31T12:00:00.000Z
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _write_json_atomic(path: Path, data: Any) -> None:
    # Readers on other threads must never see a half-written refs or commit file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _header_safe(text: str) -> str:
    # Header values must be one latin-1 line.
    return " ".join(text.split()).encode("latin-1", "replace").decode("latin-1")[:1000]


def _valid_repo_path(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and all(part not in ("", ".", "..") for part in parts) and parts[0] != ".git"


@dataclass(frozen=True)
class _Repo:
    type: str  # "model", "dataset" or "space"
    id: str  # "namespace/name"
    dir: Path

    @property
    def namespace(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def url_path(self) -> str:
        return _URL_PREFIX[self.type] + self.id


class _Store:
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

    # -- repos --
    def repo(self, repo_type: str, repo_id: str) -> _Repo:
        return _Repo(repo_type, repo_id, self.root / "repos" / f"{repo_type}s" / repo_id)

    def meta(self, repo: _Repo) -> dict[str, Any] | None:
        try:
            return json.loads((repo.dir / "repo.json").read_text())
        except FileNotFoundError:
            return None

    def save_meta(self, repo: _Repo, meta: dict[str, Any]) -> None:
        _write_json_atomic(repo.dir / "repo.json", meta)

    def create_repo(self, repo: _Repo, private: bool) -> None:
        data = DEFAULT_GITATTRIBUTES.encode()
        files = {".gitattributes": self.file_entry(self.put_bytes(data), len(data), _git_blob_oid(data), lfs=False)}
        cid = self.write_commit(repo, None, files, "initial commit", "", "system")
        _write_json_atomic(repo.dir / "refs.json", {"branches": {"main": cid}, "tags": {}, "prs": {}})
        self.save_meta(repo, {"_id": uuid.uuid4().hex[:24], "private": private, "createdAt": _now()})

    def refs(self, repo: _Repo) -> dict[str, dict[str, str]]:
        return json.loads((repo.dir / "refs.json").read_text())

    def save_refs(self, repo: _Repo, refs: dict[str, dict[str, str]]) -> None:
        _write_json_atomic(repo.dir / "refs.json", refs)

    # -- commits --
    @staticmethod
    def file_entry(sha256: str, size: int, oid: str, lfs: bool) -> dict[str, Any]:
        return {"sha256": sha256, "size": size, "oid": oid, "lfs": lfs}

    def commit_path(self, repo: _Repo, cid: str) -> Path:
        return repo.dir / "commits" / f"{cid}.json"

    def commit(self, repo: _Repo, cid: str) -> dict[str, Any]:
        key = (repo.dir, cid)
        if key not in self._commits:
            self._commits[key] = json.loads(self.commit_path(repo, cid).read_text())
        return self._commits[key]

    def write_commit(
        self, repo: _Repo, parent: str | None, files: dict[str, Any], summary: str, description: str, author: str
    ) -> str:
        date = _now()
        # Unique even for identical content, like git commits with different timestamps.
        seed = json.dumps([parent, files, summary, description, date, uuid.uuid4().hex], sort_keys=True)
        cid = hashlib.sha1(seed.encode()).hexdigest()
        commit = {"id": cid, "parent": parent, "files": files, "summary": summary,
                  "description": description, "author": author, "date": date}
        _write_json_atomic(self.commit_path(repo, cid), commit)
        return cid

    def resolve(self, repo: _Repo, revision: str) -> str | None:
        """Branch, tag, refs/heads|tags|pr/..., full commit id or unique commit-id prefix -> commit id."""
        refs = self.refs(repo)
        if revision.startswith("refs/heads/"):
            return refs["branches"].get(revision[len("refs/heads/"):])
        if revision.startswith("refs/tags/"):
            return refs["tags"].get(revision[len("refs/tags/"):])
        if match := _PR_REF.fullmatch(revision):
            return refs["prs"].get(match[1])
        if revision in refs["branches"]:
            return refs["branches"][revision]
        if revision in refs["tags"]:
            return refs["tags"][revision]
        if _HEX40.fullmatch(revision):
            return revision if self.commit_path(repo, revision).is_file() else None
        if _HEX_PREFIX.fullmatch(revision):
            matches = [p.stem for p in (repo.dir / "commits").glob(f"{revision}*.json")]
            return matches[0] if len(matches) == 1 else None
        return None

    def history(self, repo: _Repo, cid: str) -> Iterator[dict[str, Any]]:
        current: str | None = cid
        while current is not None:
            commit = self.commit(repo, current)
            yield commit
            current = commit["parent"]

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()


def _lfs_patterns(gitattributes: str) -> list[str]:
    return [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line and line.split()]


def _matches_gitattributes(path: str, patterns: list[str]) -> bool:
    basename = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        # git matches patterns without a slash against the basename, others against the whole path.
        if "/" in pattern:
            if fnmatchcase(path, pattern.replace("**/", "*").replace("**", "*")):
                return True
        elif fnmatchcase(basename, pattern):
            return True
    return False


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that sets TCP_NODELAY and tracks open connections so stop() can close keep-alive ones."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: HubServer) -> None:
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can hang without a network.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        # Without TCP_NODELAY, Nagle + delayed ACK add ~40 ms to every small keep-alive response.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._connections_lock:
            self._connections.add(sock)
        return sock, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                # shutdown() (unlike close()) wakes the handler thread blocked reading the next keep-alive request.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client dropping its connection is normal; anything else is a bug worth seeing.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            self.hub.errors.append(traceback.format_exc())
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """One HTTP/1.1 keep-alive connection; every response carries Content-Length and every request body is read."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass  # the request log is HubServer.requests

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    # -- plumbing --
    @property
    def hub(self) -> HubServer:
        return self.server.hub

    @property
    def store(self) -> _Store:
        return self.server.hub._store

    def _dispatch(self) -> None:
        self._body_read = False
        self._headers_sent = False
        raw_path, _, query = self.path.partition("?")
        self._query = parse_qs(query, keep_blank_values=True)
        # Split before unquoting: revisions arrive quoted as one segment (refs%2Fpr%2F1).
        segments = [unquote(part) for part in raw_path.split("/")[1:]]
        try:
            if self.command == "PUT" and raw_path.startswith(f"/{_LFS_PATH}/"):
                self._lfs_put(segments[-1])  # streams its (large) body to disk itself
            else:
                self._body = self._read_body()
                self._route(segments)
        except HubError as err:
            self._drain()
            self._send_error(err)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # a bug in this server: report it fast and loud, never as a (retried) 5xx
            self.hub.errors.append(traceback.format_exc())
            traceback.print_exc()
            self.close_connection = True  # the request stream may be out of step: start afresh
            if not self._headers_sent:
                self._send_error(HubError(400, f"hub_server internal error: {exc!r}", "HubServerBug",
                                          headers={"Connection": "close"}))

    def _iter_body(self) -> Iterator[bytes]:
        if self._body_read:
            return
        self._body_read = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline(65537).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield from self._read_exactly(size)
                self.rfile.readline()  # CRLF after each chunk
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0))

    def _read_exactly(self, size: int) -> Iterator[bytes]:
        while size > 0:
            chunk = self.rfile.read(min(size, _CHUNK))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            size -= len(chunk)
            yield chunk

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _drain(self) -> None:
        # An unread body would be parsed as the next request on this keep-alive connection.
        for _ in self._iter_body():
            pass

    def _send_headers(self, status: int, headers: dict[str, str], length: int) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.send_header("X-Request-Id", uuid.uuid4().hex[:16])
        self.end_headers()
        self._headers_sent = True
        self.hub.requests.append(RequestRecord(self.command, self.path, status))

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json; charset=utf-8") -> None:
        self._send_headers(status, {"Content-Type": content_type, **(headers or {})}, len(body))
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": _header_safe(err.message), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json({"error": err.message, **err.extra}, err.status, headers)

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None

    def _base_url(self) -> str:
        # Echo the host the client used, so URLs in answers match its HF_ENDPOINT.
        return f"http://{self.headers.get('Host') or '%s:%d' % (self.server.server_name, self.server.server_port)}"

    # -- auth --
    def _token(self) -> str | None:
        """The bearer token, or None; an unknown token is refused everywhere, as the Hub does."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not self.hub._known_token(token):
            # This exact message makes huggingface_hub raise a plain HfHubHTTPError (401), not RepositoryNotFound.
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _require_write(self, token: str | None, namespace: str) -> None:
        if token is None:
            raise HubError(401, "You must be authenticated (Authorization: Bearer <token>) to write to the Hub")
        if not self.hub._can_write(token, namespace):
            raise HubError(403, f"You don't have the rights to write to the namespace '{namespace}'", "Forbidden")

    def _visible_repo(self, repo_type: str, repo_id: str, token: str | None) -> tuple[_Repo, dict[str, Any]]:
        repo = self.store.repo(repo_type, repo_id)
        meta = self.store.meta(repo)
        # Private repos of other namespaces look missing (404, not 403), like on the real Hub.
        if meta is None or (meta["private"] and not (token and self.hub._can_write(token, repo.namespace))):
            raise HubError(404, f"Repository not found: {repo_type} '{repo_id}'", "RepoNotFound")
        return repo, meta

    def _resolve(self, repo: _Repo, revision: str) -> str:
        cid = self.store.resolve(repo, revision)
        if cid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return cid

    # -- routing --
    def _route(self, seg: list[str]) -> None:
        method = self.command
        if seg[:1] == ["api"]:
            return self._route_api(method, seg[1:])
        # /{datasets/|spaces/}ns/name/resolve/{rev}/{path...}
        repo_type, rest = ("model", seg)
        if seg and seg[0] in _API_TYPES and seg[0] != "models" and len(seg) > 3:
            repo_type, rest = _API_TYPES[seg[0]], seg[1:]
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]))
        # /{datasets/|spaces/}ns/name.git/info/lfs/objects/batch
        if len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"]:
            if method == "POST":
                return self._lfs_batch(repo_type, f"{rest[0]}/{rest[1][:-4]}")
        raise HubError(404, f"Not found: {method} {self.path}")

    def _route_api(self, method: str, seg: list[str]) -> None:
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if seg == ["validate-yaml"] and method == "POST":
            return self._send_json({"errors": [], "warnings": []})
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if seg == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if len(seg) >= 3 and seg[0] in _API_TYPES:
            return self._route_repo_api(method, _API_TYPES[seg[0]], f"{seg[1]}/{seg[2]}", seg[3:])
        raise HubError(404, f"Not found: {method} {self.path}")

    def _route_repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str]) -> None:
        """/api/{type}s/{ns}/{name}/{action}/{arg...}; `arg` is a revision (or branch) possibly followed by a path."""
        action = rest[0] if rest else ""
        arg = "/".join(rest[1:])
        if method == "GET" and not rest:
            return self._info(repo_type, repo_id, None)
        if method == "GET" and action == "refs":
            return self._refs(repo_type, repo_id)
        if method == "GET" and action == "discussions":
            return self._discussions(repo_type, repo_id)
        if method == "PUT" and action == "settings":
            return self._settings(repo_type, repo_id)
        if action.startswith("xet-"):
            raise HubError(400, "This test Hub does not speak Xet: set HF_HUB_DISABLE_XET=1 before importing "
                                "huggingface_hub")
        if arg:
            revision = rest[1]
            if method == "GET" and action == "revision":
                return self._info(repo_type, repo_id, arg)
            if method == "GET" and action == "tree":
                return self._tree(repo_type, repo_id, revision, "/".join(rest[2:]))
            if method == "GET" and action == "commits":
                return self._commits(repo_type, repo_id, revision)
            if method == "POST" and action == "paths-info":
                return self._paths_info(repo_type, repo_id, revision)
            if method == "POST" and action == "preupload":
                return self._preupload(repo_type, repo_id, revision)
            if method == "POST" and action == "commit":
                return self._commit(repo_type, repo_id, revision)
            if method == "POST" and action == "branch":
                return self._create_branch(repo_type, repo_id, arg)
            if method == "POST" and action == "tag":
                return self._create_tag(repo_type, repo_id, arg)
            if method == "DELETE" and action in ("branch", "tag"):
                return self._delete_ref(repo_type, repo_id, "branches" if action == "branch" else "tags", arg)
        raise HubError(404, f"Not found: {method} {self.path}")

    # -- account / repos --
    def _whoami(self) -> None:
        token = self._token()
        if token is None:
            raise HubError(401, "You must be authenticated to call whoami")
        name = self.hub._user_name(token)
        namespaces = self.hub._namespaces(token)
        orgs = sorted(namespaces - {name}) if namespaces is not None else []
        role = "write" if namespaces is None or namespaces else "read"
        self._send_json({
            "type": "user", "id": hashlib.sha1(token.encode()).hexdigest()[:24], "name": name, "fullname": name,
            "email": None, "emailVerified": False, "canPay": False, "isPro": False, "periodEnd": None,
            "avatarUrl": "", "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"}
                                      for org in orgs],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "hub_server token", "role": role, "createdAt": _now()}},
        })

    def _repo_from_payload(self, token: str | None) -> _Repo:
        body = self._json_body()
        name, organization = body.get("name"), body.get("organization")
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Unsupported repo type '{repo_type}'")
        if token is None:
            raise HubError(401, "You must be authenticated (Authorization: Bearer <token>) to write to the Hub")
        namespace = organization or self.hub._user_name(token)
        for part in (namespace, name):
            if not isinstance(part, str) or not _NAME.fullmatch(part) or "--" in part or ".." in part \
                    or part.endswith(".git"):
                raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        return self.store.repo(repo_type, f"{namespace}/{name}")

    def _create_repo(self) -> None:
        token = self._token()
        repo = self._repo_from_payload(token)
        self._require_write(token, repo.namespace)
        body = self._json_body()
        private = body.get("visibility") == "private" if "visibility" in body else bool(body.get("private"))
        url = f"{self._base_url()}/{repo.url_path}"
        with self.store.lock:
            if self.store.meta(repo) is not None:
                # exist_ok=True reads "url" from this 409 body.
                raise HubError(409, f"You already created this {repo.type} repo", extra={"url": url})
            self.store.create_repo(repo, private)
        self._send_json({"url": url, "name": repo.id, "id": repo.id})

    def _delete_repo(self) -> None:
        token = self._token()
        repo = self._repo_from_payload(token)
        self._visible_repo(repo.type, repo.id, token)
        self._require_write(token, repo.namespace)
        with self.store.lock:
            trash = self.store.temp_path()
            os.replace(repo.dir, trash)  # atomic for readers; the content is removed below
        shutil.rmtree(trash, ignore_errors=True)
        self._send(200, b"")

    def _settings(self, repo_type: str, repo_id: str) -> None:
        token = self._token()
        repo, meta = self._visible_repo(repo_type, repo_id, token)
        self._require_write(token, repo.namespace)
        body = self._json_body()
        with self.store.lock:
            meta = self.store.meta(repo) or meta
            if "visibility" in body:
                meta["private"] = body["visibility"] == "private"
            elif "private" in body:
                meta["private"] = bool(body["private"])
            self.store.save_meta(repo, meta)
        if "gated" in body:
            self.hub.set_gated(repo_id, body["gated"] not in (False, None, "false"), repo_type=repo_type)
        self._send_json({})

    # -- reading --
    def _info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        token = self._token()
        repo, meta = self._visible_repo(repo_type, repo_id, token)
        cid = self._resolve(repo, revision or "main")
        commit = self.store.commit(repo, cid)
        files: dict[str, Any] = commit["files"]
        with_blobs = self._query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                entry = files[path]
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"],
                                      "pointerSize": len(_lfs_pointer(entry["sha256"], entry["size"]))}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": meta["_id"], "id": repo.id, "author": repo.namespace, "sha": cid,
            "lastModified": commit["date"], "createdAt": meta["createdAt"], "private": meta["private"],
            "gated": "auto" if self.hub._is_gated(repo_type, repo_id) else False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings, "spaces": [],
            "usedStorage": sum(entry["size"] for entry in files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo.id
            config = self._config_summary(files)
            if config is not None:
                info["config"] = config
        self._send_json(info)

    def _config_summary(self, files: dict[str, Any]) -> dict[str, Any] | None:
        # The Hub reports a few config.json fields in model_info; tools use them to guess the architecture.
        entry = files.get("config.json")
        if entry is None or entry["size"] > LFS_SIZE_THRESHOLD:
            return None
        try:
            config = json.loads(self.store.read_blob(entry["sha256"]))
        except ValueError:
            return None
        if not isinstance(config, dict):
            return None
        return {key: config[key] for key in ("architectures", "model_type") if key in config}

    def _entries(self, repo: _Repo, cid: str, expand: bool, paths: list[str]) -> list[dict[str, Any]]:
        files: dict[str, Any] = self.store.commit(repo, cid)["files"]
        out = []
        for path in paths:
            if path in files:
                entry = files[path]
                item: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
                if entry["lfs"]:
                    item["lfs"] = {"oid": entry["sha256"], "size": entry["size"],
                                   "pointerSize": len(_lfs_pointer(entry["sha256"], entry["size"]))}
            else:
                item = {"type": "directory", "oid": self._tree_oid(files, path), "size": 0, "path": path}
            if expand:
                item["lastCommit"] = self._last_commit(repo, cid, path)
            out.append(item)
        return out

    @staticmethod
    def _under(files: dict[str, Any], folder: str) -> dict[str, str]:
        prefix = folder + "/"
        return {path: entry["oid"] for path, entry in files.items() if path.startswith(prefix)}

    def _tree_oid(self, files: dict[str, Any], folder: str) -> str:
        return hashlib.sha1(json.dumps(sorted(self._under(files, folder).items())).encode()).hexdigest()

    def _last_commit(self, repo: _Repo, cid: str, path: str) -> dict[str, str]:
        def state(commit: dict[str, Any]) -> Any:
            files = commit["files"]
            return files[path]["oid"] if path in files else self._under(files, path)

        history = list(self.store.history(repo, cid))
        last = history[0]
        for older in history[1:]:
            if state(older) != state(last):
                break
            last = older
        return {"id": last["id"], "title": last["summary"], "date": last["date"]}

    def _tree(self, repo_type: str, repo_id: str, revision: str, folder: str) -> None:
        token = self._token()
        repo, _ = self._visible_repo(repo_type, repo_id, token)
        cid = self._resolve(repo, revision)
        files: dict[str, Any] = self.store.commit(repo, cid)["files"]
        recursive = self._query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self._query.get("expand", ["false"])[0].lower() in ("1", "true")
        folder = folder.strip("/")
        prefix = f"{folder}/" if folder else ""
        if folder and not self._under(files, folder):
            raise HubError(404, f"Folder '{folder}' not found at revision {revision}", "EntryNotFound",
                           headers={"X-Repo-Commit": cid})
        paths: set[str] = set()
        for path in files:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            if recursive:
                paths.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts) + 1))
            else:
                paths.add(prefix + parts[0])
        # One page: huggingface_hub only follows a `Link: <...>; rel="next"` header, which is never sent.
        self._send_json(self._entries(repo, cid, expand, sorted(paths)))

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        token = self._token()
        repo, _ = self._visible_repo(repo_type, repo_id, token)
        cid = self._resolve(repo, revision)
        files: dict[str, Any] = self.store.commit(repo, cid)["files"]
        # The client posts a form (paths=a&paths=b&expand=false); accept JSON too.
        if "json" in self.headers.get("Content-Type", ""):
            body = self._json_body()
            wanted, expand = body.get("paths", []), bool(body.get("expand"))
        else:
            form = parse_qs(self._body.decode(), keep_blank_values=True)
            wanted, expand = form.get("paths", []), form.get("expand", ["false"])[0].lower() == "true"
        existing = [p.strip("/") for p in wanted if p.strip("/") in files or self._under(files, p.strip("/"))]
        self._send_json(self._entries(repo, cid, expand, existing))

    def _refs(self, repo_type: str, repo_id: str) -> None:
        token = self._token()
        repo, _ = self._visible_repo(repo_type, repo_id, token)
        refs = self.store.refs(repo)

        def listing(kind: str, prefix: str) -> list[dict[str, str]]:
            return [{"name": name, "ref": f"{prefix}{name}", "targetCommit": cid}
                    for name, cid in sorted(refs[kind].items())]

        data: dict[str, Any] = {"branches": listing("branches", "refs/heads/"), "converts": [],
                                "tags": listing("tags", "refs/tags/")}
        if self._query.get("include_prs"):
            data["pullRequests"] = listing("prs", "refs/pr/")
        self._send_json(data)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        token = self._token()
        repo, _ = self._visible_repo(repo_type, repo_id, token)
        cid = self._resolve(repo, revision)
        self._send_json([
            {"id": c["id"], "title": c["summary"], "message": c["description"], "date": c["date"],
             "authors": [{"user": c["author"]}]}
            for c in self.store.history(repo, cid)
        ])

    def _discussions(self, repo_type: str, repo_id: str) -> None:
        token = self._token()
        self._visible_repo(repo_type, repo_id, token)
        self._send_json({"discussions": [], "count": 0, "start": 0, "numClosedDiscussions": 0})

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        token = self._token()
        repo, _ = self._visible_repo(repo_type, repo_id, token)
        if self.hub._is_gated(repo_type, repo_id):
            raise HubError(403, f"Access to {repo_type} {repo_id} is restricted. You must have access to it and be "
                                "authenticated to access it.", "GatedRepo")
        cid = self._resolve(repo, revision)
        entry = self.store.commit(repo, cid)["files"].get(path)
        if entry is None:
            # X-Repo-Commit lets the client cache the file's absence for this commit.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": cid})
        size: int = entry["size"]
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "X-Repo-Commit": cid}
        if entry["lfs"]:
            # The client names cached blobs after the linked etag: the sha256 for LFS files.
            headers.update({"ETag": f'"{entry["sha256"]}"', "X-Linked-Etag": f'"{entry["sha256"]}"',
                            "X-Linked-Size": str(size)})
        else:
            headers["ETag"] = f'"{entry["oid"]}"'
        start, end, status = 0, size - 1, 200
        byte_range = self._parse_range(self.headers.get("Range"), size)
        if byte_range == "unsatisfiable":
            raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
        if byte_range is not None:
            start, end = byte_range
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self._send_headers(status, headers, length)
        if self.command == "HEAD" or length == 0:
            return
        with open(self.store.blob_path(entry["sha256"]), "rb") as blob:
            blob.seek(start)
            remaining = length
            while remaining:
                chunk = blob.read(min(remaining, _CHUNK))
                if not chunk:
                    raise RuntimeError(f"blob {entry['sha256']} is shorter than recorded")
                self.wfile.write(chunk)
                remaining -= len(chunk)

    @staticmethod
    def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
        """One `bytes=a-b`, `bytes=a-` or `bytes=-n` range; anything else is ignored (full answer)."""
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
        if match is None or match[1] == match[2] == "":
            return None
        if match[1] == "":
            suffix = int(match[2])
            return (max(size - suffix, 0), size - 1) if suffix and size else "unsatisfiable"
        start = int(match[1])
        end = min(int(match[2]), size - 1) if match[2] else size - 1
        if start >= size or end < start:
            return "unsatisfiable"
        return start, end

    # -- writing --
    def _writer(self, repo_type: str, repo_id: str, create_pr: bool) -> tuple[_Repo, str]:
        """Auth for commit-like calls. Like the Hub, any valid token may open a pull request on a repo it can see."""
        token = self._token()
        if token is None:
            raise HubError(401, "You must be authenticated (Authorization: Bearer <token>) to write to the Hub")
        repo, _ = self._visible_repo(repo_type, repo_id, token)
        if not create_pr:
            self._require_write(token, repo.namespace)
        return repo, token

    def _flag(self, name: str) -> bool:
        return self._query.get(name, ["0"])[0].lower() in ("1", "true")

    def _gitattributes_patterns(self, files: dict[str, Any]) -> list[str]:
        entry = files.get(".gitattributes")
        if entry is None:
            return []
        return _lfs_patterns(self.store.read_blob(entry["sha256"]).decode("utf-8", "replace"))

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, _ = self._writer(repo_type, repo_id, self._flag("create_pr"))
        cid = self._resolve(repo, revision)
        files: dict[str, Any] = self.store.commit(repo, cid)["files"]
        patterns = self._gitattributes_patterns(files)
        answer = []
        for item in self._json_body().get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample") or "")
            # The Hub's rules: big, binary (NUL byte in the first 512 bytes) or .gitattributes-tracked -> LFS.
            lfs = size >= LFS_SIZE_THRESHOLD or b"\0" in sample or _matches_gitattributes(path, patterns)
            existing = files.get(path)
            # With this oid the client skips re-uploading unchanged files (regular: git blob id, LFS: sha256).
            oid = None
            if existing is not None and existing["lfs"] == lfs:
                oid = existing["sha256"] if lfs else existing["oid"]
            answer.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": oid})
        self._send_json({"files": answer, "commitOid": cid})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        body = self._json_body()
        # The client omits "ref" when it prepares a pull request.
        repo, _ = self._writer(repo_type, repo_id, create_pr="ref" not in body)
        if body.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _SHA256.fullmatch(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": int(size or 0),
                                "error": {"code": 422, "message": "Invalid oid or size"}})
            elif self.store.blob_size(oid) == size:
                objects.append({"oid": oid, "size": size})  # no "actions": already stored, the client skips it
            else:
                self.hub._pending_lfs[oid] = size
                href = f"{self._base_url()}/{_LFS_PATH}/{oid}"
                objects.append({"oid": oid, "size": size, "authenticated": True,
                                "actions": {"upload": {"href": href, "header": {}, "expires_in": 3600}}})
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str) -> None:
        # Like a pre-signed storage URL, this takes no token; it only accepts objects announced by a batch call.
        tmp = self.store.temp_path()
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as out:
                for chunk in self._iter_body():
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            expected = self.hub._pending_lfs.get(oid)
            if expected is None:
                raise HubError(403, f"No LFS upload was announced for {oid}")
            if digest.hexdigest() != oid or size != expected:
                raise HubError(400, f"Uploaded content does not match oid {oid} / size {expected}")
            # The announcement is kept: identical files in one commit share an oid and are PUT once each.
            self.store.adopt_blob(tmp, oid)
        finally:
            tmp.unlink(missing_ok=True)
        self._send(200, b"")

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        create_pr = self._flag("create_pr")
        repo, token = self._writer(repo_type, repo_id, create_pr)
        try:
            lines = [json.loads(line) for line in self._body.splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "Commit payload is not valid NDJSON") from None
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if not header or not header.get("summary"):
            raise HubError(400, "The commit needs a header line with a non-empty summary")
        parent_commit: str | None = header.get("parentCommit")
        with self.store.lock:
            refs = self.store.refs(repo)
            pr_match = _PR_REF.fullmatch(revision)
            branch = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
            if pr_match and not create_pr and pr_match[1] in refs["prs"]:
                kind, name = "prs", pr_match[1]
            elif branch in refs["branches"]:
                kind, name = "branches", branch
            else:
                raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch or an open PR)",
                               "RevisionNotFound")
            head = refs[kind][name]
            base = head
            if parent_commit is not None:
                if create_pr:
                    base = self._resolve(repo, parent_commit)
                elif not head.startswith(parent_commit):
                    raise HubError(412, f"A commit has happened since {parent_commit}; refresh and try again")
            files = dict(self.store.commit(repo, base)["files"])
            for line in lines:
                self._apply(files, line)
            cid = self.store.write_commit(repo, base, files, header["summary"], header.get("description") or "",
                                          self.hub._user_name(token))
            pr_url = None
            if create_pr:
                number = str(max((int(n) for n in refs["prs"]), default=0) + 1)
                refs["prs"][number] = cid
                pr_url = f"{self._base_url()}/{repo.url_path}/discussions/{number}"
            else:
                refs[kind][name] = cid
            self.store.save_refs(repo, refs)
        self._send_json({"success": True, "commitOid": cid, "hookOutput": "", "pullRequestUrl": pr_url,
                         "commitUrl": f"{self._base_url()}/{repo.url_path}/commit/{cid}"})

    def _apply(self, files: dict[str, Any], line: dict[str, Any]) -> None:
        key, value = line.get("key"), line.get("value") or {}
        if key == "header":
            return
        path = str(value.get("path", "")).strip("/") if key == "deletedFolder" else value.get("path", "")
        if not isinstance(path, str) or not _valid_repo_path(path):
            raise HubError(400, f"Invalid path in commit: {path!r}")
        if key == "file":
            content = str(value.get("content", ""))
            data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            files[path] = _Store.file_entry(self.store.put_bytes(data), len(data), _git_blob_oid(data), lfs=False)
        elif key == "lfsFile":
            oid = str(value.get("oid", ""))
            size = self.store.blob_size(oid) if _SHA256.fullmatch(oid) else None
            if size is None or ("size" in value and value["size"] != size):
                raise HubError(400, f"LFS object {oid} for '{path}' was never uploaded")
            files[path] = _Store.file_entry(oid, size, _git_blob_oid(_lfs_pointer(oid, size)), lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unsupported commit operation '{key}'")

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo, _ = self._writer(repo_type, repo_id, create_pr=False)
        if not _BRANCH.fullmatch(branch) or branch.startswith("refs/") or _HEX40.fullmatch(branch):
            raise HubError(400, f"Invalid branch name: {branch}")
        starting_point = self._json_body().get("startingPoint") or "main"
        with self.store.lock:
            cid = self._resolve(repo, starting_point)
            refs = self.store.refs(repo)
            if branch in refs["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            refs["branches"][branch] = cid
            self.store.save_refs(repo, refs)
        self._send_json({})

    def _create_tag(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, _ = self._writer(repo_type, repo_id, create_pr=False)
        tag = self._json_body().get("tag")
        if not isinstance(tag, str) or not _BRANCH.fullmatch(tag) or tag.startswith("refs/"):
            raise HubError(400, f"Invalid tag name: {tag}")
        with self.store.lock:
            cid = self._resolve(repo, revision)
            refs = self.store.refs(repo)
            if tag in refs["tags"]:
                raise HubError(409, f"Reference already exists: refs/tags/{tag}")
            refs["tags"][tag] = cid
            self.store.save_refs(repo, refs)
        self._send_json({})

    def _delete_ref(self, repo_type: str, repo_id: str, kind: str, name: str) -> None:
        repo, _ = self._writer(repo_type, repo_id, create_pr=False)
        if kind == "branches" and name == "main":
            raise HubError(403, "The default branch 'main' cannot be deleted")
        with self.store.lock:
            refs = self.store.refs(repo)
            if refs[kind].pop(name, None) is None:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            self.store.save_refs(repo, refs)
        self._send(200, b"")


class HubServer:
    """Hub-compatible server on 127.0.0.1 (free port), storing repos under `root`.

    `tokens` maps each accepted token to the namespaces it may write (and whose private repos it may read);
    with `tokens=None` any non-empty token may write anywhere. Requests without a token can read public repos only.
    """

    def __init__(self, root: Path, tokens: dict[str, set[str]] | None = None) -> None:
        self.root = Path(root)
        self.tokens = None if tokens is None else {token: set(ns) for token, ns in tokens.items()}
        self.requests: list[RequestRecord] = []  # every answered request, in order
        self.errors: list[str] = []  # tracebacks of bugs in this server (should stay empty)
        self._store = _Store(self.root)
        self._gated: set[tuple[str, str]] = set()
        self._pending_lfs: dict[str, int] = {}  # oid -> size announced by an LFS batch call
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --
    def start(self) -> HubServer:
        if self._httpd is not None:
            raise RuntimeError("HubServer already started")
        self._httpd = _HTTPServer(("127.0.0.1", 0), self)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"HubServer:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close keep-alive connections and release the port. Safe to call twice."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return self._httpd.server_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- test controls --
    def set_gated(self, repo_id: str, gated: bool = True, *, repo_type: str = "model") -> None:
        """Make downloads (`resolve`) of the repo answer 403 GatedRepo, whatever the token; metadata stays readable."""
        if gated:
            self._gated.add((repo_type, repo_id))
        else:
            self._gated.discard((repo_type, repo_id))

    # -- tokens --
    def _namespaces(self, token: str) -> set[str] | None:
        """Writable namespaces of a known token; None means 'any' (tokens=None mode)."""
        return None if self.tokens is None else self.tokens.get(token, set())

    def _known_token(self, token: str) -> bool:
        return bool(token) and (self.tokens is None or token in self.tokens)

    def _can_write(self, token: str, namespace: str) -> bool:
        namespaces = self._namespaces(token)
        return self._known_token(token) and (namespaces is None or namespace in namespaces)

    def _user_name(self, token: str) -> str:
        namespaces = self._namespaces(token)
        if not namespaces or "user" in namespaces:
            return "user"
        return sorted(namespaces)[0]

    def _is_gated(self, repo_type: str, repo_id: str) -> bool:
        return (repo_type, repo_id) in self._gated


if __name__ == "__main__":  # manual use: python tests/hub_server.py [ROOT]
    import time

    server = HubServer(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())).start()
    print(f"HF_ENDPOINT={server.url}  (tokens=None: any token writes)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
