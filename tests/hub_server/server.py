"""HubServer, the test Hub's public face: start/stop on a free local port, tokens and their namespaces, test controls.
It owns the Store, the LFS uploads and the log of answered requests that tests inspect."""

from __future__ import annotations

import threading
from pathlib import Path

from .lfs import LfsUploads
from .routes import Handler
from .storage import Store
from .transport import HTTPServer, RequestRecord

__all__ = ["HubServer"]


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
        self.store = Store(self.root)
        self.lfs = LfsUploads(self.store)
        self._gated: set[tuple[str, str]] = set()
        self._httpd: HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --
    def start(self) -> HubServer:
        if self._httpd is not None:
            raise RuntimeError("HubServer already started")
        self._httpd = HTTPServer(("127.0.0.1", 0), self, Handler)
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
    def namespaces(self, token: str) -> set[str] | None:
        """Writable namespaces of a known token; None means 'any' (tokens=None mode)."""
        return None if self.tokens is None else self.tokens.get(token, set())

    def known_token(self, token: str) -> bool:
        return bool(token) and (self.tokens is None or token in self.tokens)

    def can_write(self, token: str, namespace: str) -> bool:
        namespaces = self.namespaces(token)
        return self.known_token(token) and (namespaces is None or namespace in namespaces)

    def user_name(self, token: str) -> str:
        namespaces = self.namespaces(token)
        if not namespaces or "user" in namespaces:
            return "user"
        return sorted(namespaces)[0]

    def is_gated(self, repo_type: str, repo_id: str) -> bool:
        return (repo_type, repo_id) in self._gated
