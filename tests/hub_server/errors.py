"""The one exception of the test Hub: a client error, answered the way huggingface_hub maps to its own errors.
Raised by storage, LFS and route code alike; the handler turns it into status, X-Error-Code and a JSON body."""

from __future__ import annotations

from typing import Any

__all__ = ["HubError"]


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
