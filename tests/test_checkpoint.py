"""Reading checkpoints (ame_hf/checkpoint.py): both read paths give the stored values, a file cut short after
it was opened is an error rather than short data, `.bin` pickles are loaded without running code, and fuzzed
safetensors and index files give a CheckpointError or AmeError, never a crash."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from ame_hf.checkpoint import Checkpoint
from ame_hf.errors import AmeError, CheckpointError
from factories import make_finetunes


@pytest.mark.parametrize("direct", [True, False], ids=["offset-reads", "safe_open"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_reads_match_safetensors(tmp_path, monkeypatch, direct, dtype):
    """Both read paths (bytes at the header's offsets; safe_open on big-endian machines) give the
    stored values, whole or by rows, converted on request, in fresh memory."""
    import ame_hf.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_LITTLE_ENDIAN", direct)
    path = make_finetunes(tmp_path, n=1, dtype=dtype, max_shard_size="8KB")[0]
    stored = {}
    for f in path.glob("*.safetensors"):
        stored.update(load_file(f))
    ckpt = checkpoint.Checkpoint(path)
    assert len(ckpt.files) > 1 and sorted(stored) == ckpt.names()
    for name, value in stored.items():
        assert torch.equal(ckpt.read(name), value), name
        assert torch.equal(ckpt.read(name, dtype=torch.float32), value.float()), name
        if value.dim() and value.shape[0] > 2:
            assert torch.equal(ckpt.read(name, rows=(1, 3)), value[1:3]), name
    first = ckpt.names()[0]
    a = ckpt.read(first)
    a.add_(1)  # the engine updates loaded blocks in place: a later read must not see it
    assert torch.equal(ckpt.read(first), stored[first])


def test_file_truncated_after_opening_is_a_checkpoint_error(tmp_path):
    """Reads go straight to offsets from the header: a file cut short after it was validated
    (e.g. replaced during a merge) must give CheckpointError, never short data."""
    path = make_finetunes(tmp_path / "ft", n=1)[0]
    ckpt = Checkpoint(path)
    name = max(ckpt.names(), key=lambda n: ckpt.info(n).offset)  # the last tensor in the file
    assert torch.equal(ckpt.read(name), load_file(path / "model.safetensors")[name])
    file = path / "model.safetensors"
    os.truncate(file, file.stat().st_size - 8)
    with pytest.raises(CheckpointError, match=r"cannot read tensor .* ends 8 bytes early"):
        ckpt.read(name)
    with pytest.raises(CheckpointError, match="ends 8 bytes early"):
        ckpt.read(name, rows=(0, ckpt.info(name).shape[0]))


class _RunsCode:
    """A pickle that would create `marker` when unpickled by a loader that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_bin_pickle_that_would_run_code_is_refused(tmp_path):
    path = make_finetunes(tmp_path / "ft", n=1)[0]
    (path / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"lm_head.weight": _RunsCode(marker)}, f)
    with pytest.raises(CheckpointError, match="cannot load pytorch_model.bin safely"):
        Checkpoint(path).names()
    assert not marker.exists()


# -- fuzzing -------------------------------------------------------------------------------------

def _valid_safetensors() -> bytes:
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
