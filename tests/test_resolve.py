"""Resolving ingredient references (ame_hf/resolve.py) against the tests' local Hub server: pull by ID, branch,
tag and sha, the offline cache, and one-line Hub errors (missing repo or revision, bad token, gated repo,
unreachable endpoint)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from ame_hf.errors import IngredientNotFoundError
from ame_hf.inputs import InputStage
from factories import assert_one_error_line, cli_error_line


def resolve_ref(ref: str):
    """One reference as every run resolves it (the input stage), with its weights fetched."""
    stage = InputStage()
    entry = stage.entry(ref)
    stage.fetch([entry])
    return entry.light


def test_pull_by_id_branch_tag_and_sha(repos):
    shas, dirs = repos["shas"], repos["dirs"]
    cases = [("org/hub-a", shas["a-main"], "a"), ("org/hub-a@v1", shas["a-main"], "a"),
             ("org/hub-a@v2", shas["a-v2"], "a2"), (f"org/hub-a@{shas['a-v2']}", shas["a-v2"], "a2")]
    for ref, sha, local in cases:
        ing = resolve_ref(ref)
        assert ing.sha == sha and re.fullmatch(r"[0-9a-f]{40}", ing.sha), ref
        assert (ing.path / "model.safetensors").read_bytes() == (dirs[local] / "model.safetensors").read_bytes(), ref
        assert ing.repo_id == "org/hub-a" and ing.pinned_ref == f"org/hub-a@{sha}"


def test_hub_errors_are_one_clear_line_and_fast(repos, hub, tmp_path, capsys):
    out = str(tmp_path / "o")
    cli_error_line(capsys, "merge", "org/hub-a", "org/does-not-exist", "--out", out,
                   needles=("org/does-not-exist", "not found"), max_seconds=10)
    cli_error_line(capsys, "merge", "org/hub-a", "org/hub-b@nope", "--out", out, needles=("'nope'", "revision"),
                   max_seconds=10)
    line = cli_error_line(capsys, "merge", "org/hub-a", "org/hub-b", "--out", out, "--token", "hf_bad_canary",
                          needles=("401", "token"), max_seconds=10)
    assert "hf_bad_canary" not in line
    cli_error_line(capsys, "merge", "org/hub-a", "org/hub-gated", "--out", out, needles=("gated", "accept"),
                   max_seconds=10)
    assert not os.path.exists(out)
    with pytest.raises(IngredientNotFoundError):
        resolve_ref("org/does-not-exist")


# Resolving in a child process whose HF_ENDPOINT is the unreachable one (huggingface_hub reads it at import).
_RESOLVE = """
import sys
from ame_hf.inputs import InputStage
try:
    InputStage().entry(sys.argv[1])
except OSError as err:  # what a caller of the Python API may catch
    print(type(err).__name__, err, sep="\\n")
"""


def test_unreachable_endpoint_fails_fast(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ame_hf", "merge", "org/a", "org/b", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    assert_one_error_line(proc.returncode, proc.stderr, "org/a", "cannot reach http://127.0.0.1:9", "HF_ENDPOINT",
                          exit_code=1)
    assert elapsed < 20, f"took {elapsed:.1f}s"  # a bound on hanging, not a speed measurement
    assert not (tmp_path / "o").exists()
    # Through the Python API the same failure is a HubError, so callers catching OSError also catch it.
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RESOLVE, "org/a"], capture_output=True, text=True, env=env,
                          timeout=120)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    kind, message = proc.stdout.splitlines()[:2]
    assert kind == "HubError" and "cannot reach http://127.0.0.1:9" in message, proc.stdout
    assert elapsed < 20, f"took {elapsed:.1f}s"


def test_an_endpoint_that_never_answers_fails_within_the_client_timeout(tmp_path):
    """A server that accepts connections and then says nothing (a hung proxy) must not hang a merge."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []
    stop = threading.Event()

    def accept_and_say_nothing():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    try:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ame_hf", "merge", "org/a", "org/b", "--out", str(tmp_path / "o")],
                              capture_output=True, text=True, env=env, timeout=120)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        for conn in held:
            conn.close()
        listener.close()
    assert_one_error_line(proc.returncode, proc.stderr, "org/a", f"cannot reach {url}", exit_code=1)
    assert elapsed < 30, f"took {elapsed:.1f}s"  # a bound on hanging (2 s timeout), not a speed measurement
    assert not (tmp_path / "o").exists()


def test_offline_mode_uses_the_cache(repos, tmp_path):
    from ame_hf import merge

    merge(["org/hub-a", "org/hub-b"], tmp_path / "online", progress=False)  # fills the cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "offline"
    proc = subprocess.run([sys.executable, "-m", "ame_hf", "merge", "org/hub-a", "org/hub-b", "--out", str(out),
                           "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "online" / "model.safetensors").read_bytes()
    assert repos["shas"]["a-main"] in (out / "ame_config.yaml").read_text()
    proc = subprocess.run([sys.executable, "-m", "ame_hf", "merge", "org/hub-a", "org/never-downloaded", "--out",
                           str(tmp_path / "o2")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert_one_error_line(proc.returncode, proc.stderr, "org/never-downloaded", "HF_HUB_OFFLINE", exit_code=1)
