"""Shared pytest setup: one local Hugging Face Hub-compatible server (tests/hub_server/) for the whole session.

huggingface_hub reads HF_ENDPOINT and the other HF_* settings once, when it is first imported. So this module starts
the server and points the environment at it at import time, before any test module imports huggingface_hub,
transformers or ame_hf. Nothing can reach the real Hub from the tests: every client call lands on this server.

Fixtures: `hub` (the HubServer; tokens below) and `hub_token` (a token that may write the "user" and "org"
namespaces). "hf_read_token" is a valid token that may write nowhere. The server is shared by the session, so each
test should use repo names of its own.

Checkpoints that several test modules use are session fixtures here too (built once with tests/factories.py;
tests only read them): `llamas`, `finetunes`, `berts`, `classifiers`, `lm_adapters`, `big_ingredients`, and `repos`
on the Hub.
"""

from __future__ import annotations

import atexit
import json
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


# -- checkpoints shared by several test modules ------------------------------------------------

@pytest.fixture(scope="session")
def llamas(tmp_path_factory) -> list[Path]:
    """Three tiny llama fine-tunes of one base."""
    from factories import make_finetunes

    return make_finetunes(tmp_path_factory.mktemp("llamas"), n=3)


@pytest.fixture(scope="session")
def finetunes(tmp_path_factory) -> list[Path]:
    """Four tiny llama fine-tunes, perturbed further (scale 0.05) so that AME moves well away from the soup."""
    from factories import make_finetunes

    return make_finetunes(tmp_path_factory.mktemp("ft"), n=4, scale=0.05)


@pytest.fixture(scope="session")
def berts(tmp_path_factory) -> tuple[list[Path], Path]:
    """Two untrained tiny BERT classifiers and a three-line validation JSONL file: (directories, file)."""
    from factories import make_finetunes

    root = tmp_path_factory.mktemp("berts")
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps({"text": "red cat", "label": 0}) + "\n" for _ in range(3)))
    return make_finetunes(root, n=2, kind="bert"), val


@pytest.fixture(scope="session")
def classifiers(tmp_path_factory) -> tuple[list[Path], Path]:
    """Three tiny text classifiers trained on label-skewed data, and a balanced validation file."""
    from factories import make_text_classifiers

    return make_text_classifiers(tmp_path_factory.mktemp("cls"), n=3, steps=40)


@pytest.fixture(scope="session")
def lm_experts(tmp_path_factory) -> tuple[list[Path], Path, Path]:
    """The demo's three tiny GPT-2 experts (with tokenizers), a validation and a test `.txt` file."""
    from factories import make_lm_experts

    return make_lm_experts(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="session")
def lm_adapters(tmp_path_factory) -> dict:
    """A tiny llama base with a tokenizer, two LoRA adapters of it, a full fine-tune, peft's merge_and_unload()
    of each adapter and a validation `.txt` (`factories.make_lm_adapters`)."""
    from factories import make_lm_adapters

    return make_lm_adapters(tmp_path_factory.mktemp("lm-adapters"))


@pytest.fixture(scope="session")
def big_ingredients(tmp_path_factory) -> list[Path]:
    """Three checkpoints of one 60_000 x 256 tensor (61 MB each): a merge of them can be interrupted mid-write."""
    from factories import make_big_checkpoints

    return make_big_checkpoints(tmp_path_factory.mktemp("big"))


@pytest.fixture(scope="session")
def repos(hub, hub_token, tmp_path_factory) -> dict:
    """Hub repos: org/hub-a (main + branch `v2` + tag `v1`), org/hub-b, org/hub-wide (other shapes),
    org/hub-bert, org/hub-gated. Returns {"dirs": local copies a, b, a2; "shas": commits a-main, a-v2, b}."""
    from huggingface_hub import HfApi

    from factories import make_finetunes

    def upload(repo_id: str, folder: Path, **kwargs) -> str:
        api.create_repo(repo_id, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, **kwargs).oid

    root = tmp_path_factory.mktemp("hubmodels")
    api = HfApi(token=hub_token)
    a, b, a2 = make_finetunes(root / "ab", n=3)
    (a / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a\n")
    (b / "README.md").write_text("---\nlicense: apache-2.0\n---\n# b\n")
    shas = {"a-main": upload("org/hub-a", a), "b": upload("org/hub-b", b)}
    api.create_tag("org/hub-a", tag="v1")
    api.create_branch("org/hub-a", branch="v2")
    shas["a-v2"] = upload("org/hub-a", a2, revision="v2")
    wide = make_finetunes(root / "wide", n=1, intermediate_size=48)[0]
    upload("org/hub-wide", wide)
    bert = make_finetunes(root / "bert", n=1, kind="bert")[0]
    upload("org/hub-bert", bert)
    upload("org/hub-gated", b)
    hub.set_gated("org/hub-gated", True)
    return {"dirs": {"a": a, "b": b, "a2": a2}, "shas": shas}
