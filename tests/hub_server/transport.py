"""HTTP/1.1 plumbing of the test Hub: the threading server and the base handler that reads bodies and answers.
Knows nothing of Hub URLs; every answer is logged as a RequestRecord with the body bytes it sent."""

from __future__ import annotations

import json
import socket
import socketserver
import sys
import traceback
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, NamedTuple, Protocol

from .errors import HubError
from .lfs import LfsUploads
from .storage import Store

__all__ = ["CHUNK", "BaseHandler", "HTTPServer", "HubState", "RequestRecord"]

CHUNK = 1 << 20


class RequestRecord(NamedTuple):
    """One handled request, kept so tests can check which endpoints the client really called."""

    method: str
    path: str
    status: int
    bytes_sent: int = 0  # body bytes of the answer (0 for HEAD); with ranges, what a partial read really cost


class HubState(Protocol):
    """What the handler needs from HubServer (kept as a protocol so this module does not import the server)."""

    requests: list[RequestRecord]
    errors: list[str]
    store: Store
    lfs: LfsUploads

    def namespaces(self, token: str) -> set[str] | None: ...
    def known_token(self, token: str) -> bool: ...
    def can_write(self, token: str, namespace: str) -> bool: ...
    def user_name(self, token: str) -> str: ...
    def is_gated(self, repo_type: str, repo_id: str) -> bool: ...
    def set_gated(self, repo_id: str, gated: bool = True, *, repo_type: str = "model") -> None: ...


def header_safe(text: str) -> str:
    # Header values must be one latin-1 line.
    return " ".join(text.split()).encode("latin-1", "replace").decode("latin-1")[:1000]


class HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that sets TCP_NODELAY and tracks open connections so stop() can close keep-alive ones."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: HubState, handler: type[BaseHandler]) -> None:
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

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


class BaseHandler(BaseHTTPRequestHandler):
    """One HTTP/1.1 keep-alive connection; every response carries Content-Length and every request body is read.

    Subclasses implement `_dispatch`, which must read (or drain) the body and answer exactly once.
    """

    protocol_version = "HTTP/1.1"
    server: HTTPServer
    _body: bytes
    _query: dict[str, list[str]]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass  # the request log is HubServer.requests

    def do_GET(self) -> None:
        self._body_read = False
        self._headers_sent = False
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _dispatch(self) -> None:
        raise NotImplementedError

    @property
    def hub(self) -> HubState:
        return self.server.hub

    @property
    def store(self) -> Store:
        return self.server.hub.store

    # -- request body --
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
            chunk = self.rfile.read(min(size, CHUNK))
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

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None

    def _flag(self, name: str) -> bool:
        """A boolean query parameter (`?name=1` or `?name=true`)."""
        return self._query.get(name, ["0"])[0].lower() in ("1", "true")

    # -- answers --
    def _send_headers(self, status: int, headers: dict[str, str], length: int) -> None:
        """Status and headers of an answer whose body (not sent for HEAD) the caller then writes: `length` bytes."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.send_header("X-Request-Id", uuid.uuid4().hex[:16])
        # Recorded before the headers go out (end_headers sends them): a client that has its answer, a HEAD's
        # included (it has no body to wait for), always finds the record.
        bytes_sent = 0 if self.command == "HEAD" else length
        self.hub.requests.append(RequestRecord(self.command, self.path, status, bytes_sent))
        self.end_headers()
        self._headers_sent = True

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json; charset=utf-8") -> None:
        self._send_headers(status, {"Content-Type": content_type, **(headers or {})}, len(body))
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": header_safe(err.message), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json({"error": err.message, **err.extra}, err.status, headers)

    def _base_url(self) -> str:
        # Echo the host the client used, so URLs in answers match its HF_ENDPOINT.
        return f"http://{self.headers.get('Host') or '%s:%d' % (self.server.server_name, self.server.server_port)}"
