"""Interruptions, determinism, secrets, remote code and fuzzing of the readers (issue: reliability)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ame_hf import AmeConfig
from ame_hf.checkpoint import Checkpoint
from ame_hf.cli import main
from ame_hf.errors import AmeError, CheckpointError, InvalidConfigError
from factories import make_finetunes, weights_sha256
from hub_server import HubServer

ROWS, COLS = 60_000, 256  # 61 MB per ingredient: long enough to interrupt mid-write


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    paths = []
    for i in range(3):
        d = root / f"big{i}"
        d.mkdir()
        gen = torch.Generator().manual_seed(i)
        save_file({"embed.weight": torch.randn(ROWS, COLS, generator=gen), "norm.weight": torch.ones(COLS)},
                  d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": COLS}))
        paths.append(d)
    return paths


def _start(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "ame_hf", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def _staging(parent: Path):
    return list(parent.glob(".ame-tmp-*"))


def test_sigint_mid_merge_cleans_up_and_rerun_succeeds(big, tmp_path):
    out = tmp_path / "out"
    proc = _start(["merge", *big, "--out", out, "--optimizer", "adam", "--lr", "1e-3", "--epochs", "3", "--quiet"])
    _wait_for(lambda: any((s / "model.safetensors").exists() for s in _staging(tmp_path)))
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not _staging(tmp_path)
    assert main(["merge", *map(str, big), "--out", str(out), "--optimizer", "sgd", "--quiet"]) == 0


def test_sigkill_mid_merge_keeps_previous_output(big, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ame_config.yaml").write_text("# a previous ame-hf output\n")
    (out / "previous.txt").write_text("previous")
    proc = _start(["merge", *big, "--out", out, "--overwrite", "--optimizer", "adam", "--lr", "1e-3", "--epochs", "3",
                   "--quiet"])
    _wait_for(lambda: any((s / "model.safetensors").exists() for s in _staging(tmp_path)))
    time.sleep(0.3)
    proc.kill()
    proc.communicate(timeout=60)
    assert (out / "previous.txt").read_text() == "previous" and len(list(out.iterdir())) == 2
    assert _staging(tmp_path)  # a killed process cannot clean up ...
    assert main(["merge", *map(str, big), "--out", str(out), "--overwrite", "--optimizer", "sgd", "--quiet"]) == 0
    assert not _staging(tmp_path)  # ... but the next run removes what dead runs left
    assert (out / "model.safetensors").is_file() and not (out / "previous.txt").exists()


def test_sigint_mid_push_keeps_local_output(big, hub, hub_token, tmp_path):
    out = tmp_path / "out"
    assert main(["merge", *map(str, big), "--out", str(out), "--optimizer", "sgd", "--quiet"]) == 0
    before = weights_sha256(out)
    seen = len(hub.requests)
    proc = _start(["push", out, "--repo-id", "user/interrupted", "--token", hub_token])
    _wait_for(lambda: any("preupload" in r.path or "lfs" in r.path for r in hub.requests[seen:]))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err
    assert weights_sha256(out) == before
    assert main(["push", str(out), "--repo-id", "user/interrupted", "--token", hub_token]) == 0


def test_three_runs_and_yaml_reproduction_are_identical(tmp_path):
    paths = make_finetunes(tmp_path / "ft", n=4)
    cfg = AmeConfig(optimizer="nadam", relative_lr=0.05, shuffle=True, seed=11, epochs=2, batch_size=2)
    from ame_hf import merge

    hashes = [weights_sha256(merge(paths, tmp_path / f"run{i}", cfg, progress=False).path) for i in range(3)]
    assert hashes[0] == hashes[1] == hashes[2]
    assert main(["merge", "--config", str(tmp_path / "run0" / "ame_config.yaml"), "--out", str(tmp_path / "yaml"),
                 "--quiet"]) == 0
    assert weights_sha256(tmp_path / "yaml") == hashes[0]
    # The card has versions but no clock: the weights never depend on time.
    assert "ame_hf" in (tmp_path / "run0" / "model.safetensors").read_bytes()[:4096].decode("latin-1")


CANARY = "hf_canary_5a7c0ffee0123456789"


def test_token_never_leaks(tmp_path):
    server = HubServer(tmp_path / "hub", tokens={CANARY: {"user"}}).start()
    try:
        paths = make_finetunes(tmp_path / "ft", n=2)
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "home")}
        outputs = []
        for i, (token_args, extra_env) in enumerate([(["--token", CANARY], {}), ([], {"HF_TOKEN": CANARY})]):
            out = tmp_path / f"out{i}"
            proc = subprocess.run([sys.executable, "-m", "ame_hf", "merge", *map(str, paths), "--out", str(out),
                                   "--push", "--repo-id", f"user/secret{i}", "--debug", *token_args],
                                  capture_output=True, text=True, env={**env, **extra_env})
            assert proc.returncode == 0, proc.stderr
            outputs += [proc.stdout, proc.stderr]
            outputs += [f.read_bytes().decode("latin-1") for f in out.rglob("*") if f.is_file()]
            # A failing push with --debug shows a traceback: it must not carry the token either.
            fail = subprocess.run([sys.executable, "-m", "ame_hf", "push", str(out), "--repo-id", "other/x",
                                   "--debug", *token_args], capture_output=True, text=True, env={**env, **extra_env})
            assert fail.returncode != 0 and "Traceback" in fail.stderr
            outputs += [fail.stdout, fail.stderr]
        outputs += [f.read_bytes().decode("latin-1") for f in (tmp_path / "home").rglob("*") if f.is_file()]
        assert all(CANARY not in text for text in outputs)
    finally:
        server.stop()


def test_remote_code_is_never_copied_or_run(tmp_path, capsys):
    paths = make_finetunes(tmp_path / "ft", n=2)
    marker = tmp_path / "code-ran"
    for p in paths:
        cfg = json.loads((p / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
        (p / "config.json").write_text(json.dumps(cfg))
        (p / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    out = tmp_path / "out"
    assert main(["merge", *map(str, paths), "--out", str(out)]) == 0
    assert "auto_map" in capsys.readouterr().err  # warned
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert not list(out.glob("*.py")) and not marker.exists()
    from ame_hf import from_pretrained

    with pytest.raises(InvalidConfigError, match="trust_remote_code"):
        from_pretrained(paths, model_kwargs={"trust_remote_code": True})


# -- fuzzing -------------------------------------------------------------------------------------

def _valid_safetensors() -> bytes:
    import io

    from safetensors.torch import save

    return save({"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(2, dtype=torch.int64)},
                metadata={"format": "pt"})


VALID = _valid_safetensors()


def _read_everything(directory: Path) -> None:
    ckpt = Checkpoint(directory)
    for name in ckpt.names():
        ckpt.read(name)
        if ckpt.info(name).shape:
            ckpt.read(name, (0, 1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=512),
    st.tuples(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=8)).map(
        lambda m: VALID[:m[0]] + m[1] + VALID[m[0] + len(m[1]):]),
    st.integers(0, len(VALID)).map(lambda n: VALID[:n]),
))
def test_fuzz_checkpoint_reader(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(data)
    try:
        _read_everything(d)
    except CheckpointError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      st.dictionaries(st.sampled_from(["optimizer", "lr", "epochs", "pivot", "seed", "shuffle",
                                                       "optimizer_args", "dtype", "bogus", "batch_size"]),
                                      st.one_of(st.none(), st.integers(-5, 5), st.floats(allow_nan=True),
                                                st.text(max_size=10), st.booleans(), st.lists(st.integers(), max_size=3)),
                                      max_size=6).map(json.dumps)))
def test_fuzz_config_loader(text):
    try:
        AmeConfig.from_yaml(text if "\n" in text else text + "\n")
    except InvalidConfigError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.one_of(st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                       st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=12), st.integers()),
                                       max_size=4).map(lambda m: json.dumps({"weight_map": m}))))
def test_fuzz_index_file(tmp_path_factory, index):
    d = tmp_path_factory.mktemp("fuzzidx")
    (d / "config.json").write_text("{}")
    (d / "model.safetensors.index.json").write_text(index, encoding="latin-1")
    try:
        _read_everything(d)
    except AmeError:
        pass
