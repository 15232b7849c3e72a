"""Byte identity of merge outputs across refactors: a fixed set of merges must keep the sha256 of every
weight file recorded in `tests/fixtures/golden_sha256.json` (recorded before the module redesign).

The shard header's `ame_config_sha256` stamp hashes the ingredients' paths (or resolved shas), which differ
from run to run here, so that one value is blanked before hashing; every other byte counts.

Re-record only on purpose (a change that is meant to change output bytes), and say why in the commit:
`python tests/test_byte_identity.py --record`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factories import load_state, make_finetunes, save_base

GOLDEN = Path(__file__).parent / "fixtures" / "golden_sha256.json"

# name -> (ingredient kind, CLI options). Every case runs on the CPU, in one process unless named "2proc".
CASES: dict[str, tuple[str, list[str]]] = {
    "soup": ("fp32", ["--optimizer", "sgd"]),
    "adam-default": ("fp32", []),
    "adam-lr": ("fp32", ["--optimizer", "adam", "--lr", "1e-3"]),
    "adagrad-batches": ("fp32", ["--optimizer", "adagrad", "--relative-lr", "0.05", "--batch-size", "2",
                                 "--epochs", "2"]),
    "rmsprop-harmonic": ("fp32", ["--optimizer", "rmsprop", "--lr", "0.01", "--schedule", "harmonic"]),
    "adamw-shuffled": ("fp32", ["--optimizer", "adamw", "--relative-lr", "0.02", "--shuffle", "--seed", "7",
                                "--epochs", "3", "--optimizer-args", '{"betas": [0.8, 0.95]}']),
    "pivot-base-sharded": ("fp32", ["--pivot", "BASE", "--max-shard-size", "12KB", "--relative-lr", "0.1"]),
    "pivot-first-f64": ("fp32", ["--pivot", "first", "--compute-dtype", "float64", "--relative-lr", "0.1"]),
    "bf16": ("bf16", ["--relative-lr", "0.05"]),
    "bf16-to-fp32": ("bf16", ["--dtype", "float32", "--optimizer", "sgd"]),
    "2proc": ("fp32", ["--relative-lr", "0.1", "--shuffle", "--epochs", "2", "--max-shard-size", "12KB"]),
}


_STAMP = re.compile(rb'"ame_config_sha256":"[0-9a-f]{16}"')


def file_digests(path: Path) -> dict[str, str]:
    """sha256 of every weight file and index of an output, with the path-dependent stamp blanked."""
    return {f.name: hashlib.sha256(_STAMP.sub(b'"ame_config_sha256":"' + b"0" * 16 + b'"', f.read_bytes())).hexdigest()
            for f in sorted(Path(path).iterdir()) if f.name.endswith((".safetensors", ".index.json"))}


def tensor_digest(path: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (independent of the shard header's stamp)."""
    h = hashlib.sha256()
    for name, t in sorted(load_state(path).items()):
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _inputs(root: Path) -> dict[str, list[Path]]:
    return {"fp32": make_finetunes(root / "fp32", n=3, max_shard_size="10KB"),
            "bf16": make_finetunes(root / "bf16", n=3, dtype=torch.bfloat16, seed=1),
            "base": [save_base(root / "base")]}


def _run_case(name: str, inputs: dict[str, list[Path]], out: Path) -> dict[str, str]:
    kind, options = CASES[name]
    options = [str(inputs["base"][0]) if o == "BASE" else o for o in options]
    args = ["merge", *map(str, inputs[kind]), "--out", str(out), "--quiet", "--device", "cpu", *options]
    if name == "2proc":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ame_hf",
               *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        from ame_hf.cli import main

        assert main(args) == 0
    return {**file_digests(out), "tensors": tensor_digest(out)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, list[Path]]:
    return _inputs(tmp_path_factory.mktemp("golden-inputs"))


def _golden() -> dict[str, dict[str, str]]:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_weight_files_keep_their_recorded_sha256(name, inputs, tmp_path):
    assert _run_case(name, inputs, tmp_path / "out") == _golden()[name]


def test_a_hub_ref_merges_to_the_same_tensors_as_the_local_directories(inputs, hub, hub_token, tmp_path):
    from huggingface_hub import HfApi

    from ame_hf.cli import main

    api = HfApi(endpoint=hub.url, token=hub_token)
    refs = []
    for i, folder in enumerate(inputs["fp32"]):
        repo_id = f"org/golden-{i}"
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder)
        refs.append(repo_id)
    out = tmp_path / "hub"
    assert main(["merge", *refs, "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert {**file_digests(out), "tensors": tensor_digest(out)} == _golden()["adam-default"]


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        made = _inputs(Path(tmp))
        golden = {name: _run_case(name, made, Path(tmp) / "out" / name) for name in sorted(CASES)}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
    print(f"recorded {len(golden)} cases in {GOLDEN}")
