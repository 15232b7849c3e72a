"""Shared pytest setup: one local Hugging Face Hub-compatible server (tests/hub_server/) for the whole session.

huggingface_hub reads HF_ENDPOINT and the other HF_* settings once, when it is first imported. So this module starts
the server and points the environment at it at import time, before any test module imports huggingface_hub,
transformers or ame_hf. Nothing can reach the real Hub from the tests: every client call lands on this server.

Fixtures: `hub` (the HubServer; tokens below) and `hub_token` (a token that may write the "user" and "org"
namespaces). "hf_read_token" is a valid token that may write nowhere. The server is shared by the session, so each
test should use repo names of its own.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from hub_server import HubServer

if "huggingface_hub" in sys.modules:  # its constants would already point at the real Hub
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py could set HF_ENDPOINT")

HUB_TOKENS: dict[str, set[str]] = {"hf_write_token": {"user", "org"}, "hf_read_token": set()}
WRITE_TOKEN = "hf_write_token"

_TMP = Path(tempfile.mkdtemp(prefix="ame-hf-tests-"))
_HUB = HubServer(_TMP / "hub", tokens=HUB_TOKENS).start()  # binds a free port now, so HF_ENDPOINT can name it

os.environ.update({
    "HF_ENDPOINT": _HUB.url,
    "HF_HOME": str(_TMP / "hf_home"),  # fresh cache and no stored token
    "HF_HUB_DISABLE_XET": "1",  # hf_xet would upload big files to a Xet CAS this server does not implement
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_ETAG_TIMEOUT": "5",  # a local server answers at once; fail fast if it does not
    "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    "HF_HUB_OFFLINE": "0",
    "TRANSFORMERS_OFFLINE": "0",
})
for _name in ("NO_PROXY", "no_proxy"):  # never send 127.0.0.1 traffic through a proxy
    os.environ[_name] = ",".join(filter(None, [os.environ.get(_name), "127.0.0.1", "localhost"]))
# Settings that would bypass HF_HOME or send a token the server does not know (401 on every call).
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
              "TRANSFORMERS_CACHE", "HF_XET_CACHE"):
    os.environ.pop(_name, None)


def _shutdown() -> None:
    _HUB.stop()
    shutil.rmtree(_TMP, ignore_errors=True)


atexit.register(_shutdown)  # also covers runs that end before pytest_sessionfinish


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _shutdown()


@pytest.fixture(scope="session")
def hub() -> HubServer:
    """The session's Hub server (already started; HF_ENDPOINT points at it)."""
    return _HUB


@pytest.fixture(scope="session")
def hub_token() -> str:
    """A token that may write the "user" and "org" namespaces of `hub`."""
    return WRITE_TOKEN
