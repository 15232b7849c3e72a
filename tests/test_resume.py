"""Resumable merges (ame_hf/journal.py): a merge stopped by kill -9 or a failed write, started again with the same
command and `--resume`, keeps the tensors it finished (verified against the sha256 each was recorded with),
redoes the rest and any whose bytes changed, and publishes the bytes of a run that never stopped; `--resume` of
another merge is refused in one line. Across machines: two `torchrun` node ranks write one output, bit-identical
to one process, and a merge they started is finished by one process with `--resume`."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ame_hf import merge
from ame_hf.cli import main
from ame_hf.errors import OutputError
from ame_hf.journal import JOURNAL_DIR
from factories import cli_error_line, make_finetunes, start_cli, wait_for
from test_output import snapshot

# Slow enough (40 epochs of Adam) to be stopped part-way; shards small enough that there are several.
COMMON = ["--optimizer", "adam", "--relative-lr", "0.1", "--epochs", "40", "--max-shard-size", "12KB",
          "--device", "cpu"]


def _staging(parent: Path) -> list[Path]:
    return sorted(parent.glob(".ame-tmp-*"))


def _records(staging: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((staging / JOURNAL_DIR).glob("done-*.jsonl"))
            for line in f.read_text().splitlines() if line.endswith("}")]


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory) -> list[Path]:
    return make_finetunes(tmp_path_factory.mktemp("resume") / "ft", n=3, max_shard_size="10KB")


@pytest.fixture(scope="module")
def reference(ingredients, tmp_path_factory) -> Path:
    """The same merge, never stopped (its folder is named `out`, as the others', so that the cards match)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(["merge", *map(str, ingredients), "--out", str(out), "--quiet", *COMMON]) == 0
    return out


@pytest.fixture(scope="module")
def killed(ingredients, tmp_path_factory) -> Path:
    """The staging folder of the same merge killed (SIGKILL) once it had recorded a few tensors."""
    parent = tmp_path_factory.mktemp("killed")
    proc = start_cli("merge", *ingredients, "--out", parent / "out", "--quiet", *COMMON)
    wait_for(lambda: any(len(_records(s)) >= 3 for s in _staging(parent)), timeout=120)
    proc.kill()
    proc.communicate(timeout=60)
    [staging] = _staging(parent)
    assert not (parent / "out").exists()
    return staging


def _copy_of(killed: Path, tmp_path: Path) -> Path:
    shutil.copytree(killed, tmp_path / killed.name, symlinks=True)
    return tmp_path / killed.name


def test_a_killed_merge_resumes_bit_identical(ingredients, reference, killed, tmp_path, capsys, monkeypatch):
    staging = _copy_of(killed, tmp_path)
    records = _records(staging)
    total = len(json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"])
    assert 3 <= len(records) < total, "the kill landed after the merge finished: slow it down"
    # A power loss may leave a record whose bytes never reached the disk, and a torn last line.
    victim = records[0]["tensor"]
    index = json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"]
    header_len = int.from_bytes((staging / index[victim]).read_bytes()[:8], "little")
    header = json.loads((staging / index[victim]).read_bytes()[8:8 + header_len])
    start = 8 + header_len + header[victim]["data_offsets"][0]
    with open(staging / index[victim], "r+b") as f:
        f.seek(start)
        byte = f.read(1)
        f.seek(start)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(next((staging / JOURNAL_DIR).glob("done-*.jsonl")), "a") as f:
        f.write('{"tensor": "model.norm.wei')
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["merge", *map(str, ingredients), "--out", "out", "--resume", *COMMON]) == 0
    said = [line.removeprefix("INFO: ") for line in capsys.readouterr().err.splitlines() if "resuming:" in line]
    assert said == [f"resuming: {len(records) - 1} of {total} tensor(s) already written and verified; "
                    "1 recorded ones redone"], said
    assert snapshot(tmp_path / "out") == snapshot(reference)  # every byte, the card and ame_config.yaml too
    assert not _staging(tmp_path) and not list((tmp_path / "out").rglob(JOURNAL_DIR))


def test_resume_of_another_merge_is_refused_in_one_line(ingredients, killed, tmp_path, monkeypatch, capsys):
    staging = _copy_of(killed, tmp_path)
    before = snapshot(staging)
    monkeypatch.chdir(tmp_path)
    other = [c if c != "0.1" else "0.2" for c in COMMON]
    line = cli_error_line(capsys, "merge", *ingredients, "--out", "out", "--resume", *other, "--quiet",
                          needles=["--resume", staging.name, "another recipe", "without --resume"], exit_code=1)
    assert "resume=True" not in line
    assert snapshot(staging) == before and not (tmp_path / "out").exists()  # left for the right command
    # Without --resume, today's guarantee: what the dead run left is removed, the merge starts over.
    assert main(["merge", *map(str, ingredients), "--out", "out", "--quiet", *other]) == 0
    assert not _staging(tmp_path)


def test_a_full_disk_keeps_the_finished_part_for_resume(ingredients, reference, tmp_path):
    """A failed write (here ENOSPC from the progress callback, where a full disk would raise it) with resume=True
    leaves the staging folder, never anything at out; without resume it is removed as before."""
    def full_disk(done, total):
        if done > total // 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    options = dict(optimizer="adam", relative_lr=0.1, epochs=40, max_shard_size="12KB", device="cpu", progress=False)
    with pytest.raises(OutputError, match="not enough space"):
        merge(ingredients, tmp_path / "gone" / "out", callback=full_disk, **options)
    assert not list((tmp_path / "gone").iterdir())
    with pytest.raises(OutputError, match="not enough space"):
        merge(ingredients, tmp_path / "out", callback=full_disk, resume=True, **options)
    [staging] = _staging(tmp_path)
    assert _records(staging) and not (tmp_path / "out").exists()
    merge(ingredients, tmp_path / "out", resume=True, **options)
    assert snapshot(tmp_path / "out") == snapshot(reference)
    assert not _staging(tmp_path)


def test_the_recorded_hash_is_the_sha256_of_the_tensors_bytes(tmp_path, monkeypatch):
    """Read back in pieces (here 1000 bytes, so across piece boundaries), as hashlib hashes the bytes written."""
    import hashlib

    import torch

    import ame_hf.journal
    from ame_hf.plan import plan_shards
    from ame_hf.writer import create_shard_files, write_rows

    monkeypatch.setattr(ame_hf.journal, "_CHUNK", 1000)
    plan = plan_shards([("w", (300, 7), torch.float32), ("b", (5,), torch.bfloat16), ("e", (0,), torch.float32)],
                       2**20, {})
    create_shard_files(tmp_path, plan)
    w, b = torch.randn(300, 7), torch.randn(5).bfloat16()
    write_rows(tmp_path, plan, "w", 0, w)
    write_rows(tmp_path, plan, "b", 0, b)
    assert ame_hf.journal.tensor_sha256(tmp_path, plan, "w") == hashlib.sha256(w.numpy().tobytes()).hexdigest()
    assert ame_hf.journal.tensor_sha256(tmp_path, plan, "b") == hashlib.sha256(b.view(torch.int16).numpy().tobytes()).hexdigest()
    assert ame_hf.journal.tensor_sha256(tmp_path, plan, "e") == hashlib.sha256(b"").hexdigest()


def test_a_tensor_whose_write_failed_is_never_recorded():
    """The record is queued after the tensor's last write; if that write failed (a full disk, part of the bytes
    written), the journal must not vouch for what is in the file."""
    from concurrent.futures import Future

    from ame_hf.streaming import _after_write

    failed: Future = Future()
    failed.set_exception(OSError(errno.ENOSPC, "No space left on device"))
    recorded: list[tuple] = []
    with pytest.raises(OSError):
        _after_write(failed, lambda *a: recorded.append(a), "w", lambda: "d")
    assert recorded == []
    done: Future = Future()
    done.set_result(None)
    _after_write(done, lambda *a: recorded.append(a), "w", lambda: "d")
    assert recorded == [("w", "d")]


def test_the_journal_hashes_the_bytes_as_written_and_reads_nothing_back(ingredients, tmp_path, monkeypatch, caplog):
    """Each tensor's sha256 is taken from the bytes `write_rows` writes, in blocks of rows here (64 elements), not
    read back from its shard (a second read of the whole output); it equals the digest of the tensor's bytes in the
    shard, and `--resume` verifies every recorded tensor against it."""
    import hashlib
    import logging

    import torch
    from safetensors import safe_open

    import ame_hf.journal
    from ame_hf import plan

    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 64)
    read_back: list[str] = []
    real = ame_hf.journal.tensor_sha256
    monkeypatch.setattr(ame_hf.journal, "tensor_sha256", lambda d, p, name: read_back.append(name) or real(d, p, name))

    def full_disk(done, total):
        if done > total // 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    options = dict(optimizer="adam", relative_lr=0.1, max_shard_size="12KB", device="cpu", progress=False)
    with pytest.raises(OutputError, match="not enough space"):
        merge(ingredients, tmp_path / "out", callback=full_disk, resume=True, **options)
    assert read_back == []  # was: every recorded tensor read back from the staging shard
    [staging] = _staging(tmp_path)
    records = _records(staging)
    shards = {}
    for shard in staging.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            shards.update({name: f.get_tensor(name) for name in f.keys()})
    blocks = 0
    for entry in records:
        tensor = shards[entry["tensor"]].contiguous()
        assert entry["sha256"] == hashlib.sha256(tensor.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        blocks += tensor.numel() > 64
    assert blocks, "no recorded tensor was written in more than one block"
    with caplog.at_level(logging.INFO, logger="ame_hf.journal"):
        merge(ingredients, tmp_path / "out", resume=True, **options)
    assert f"resuming: {len(records)} of" in caplog.text and "0 recorded ones redone" in caplog.text
    assert read_back and set(read_back) <= {e["tensor"] for e in records}  # the resume's verification reads them


def test_resume_is_idempotent(ingredients, reference, tmp_path, monkeypatch, capsys):
    """With nothing to resume it starts from the beginning; once finished, the same command does nothing (a job
    submitted again); another merge over the finished output is refused as without --resume."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        capsys.readouterr()
        assert main(["merge", *map(str, ingredients), "--out", "out", "--resume", *COMMON]) == 0
        assert snapshot(tmp_path / "out") == snapshot(reference)
    assert "out already holds this merge, finished: nothing to do" in capsys.readouterr().err
    other = [c if c != "0.1" else "0.2" for c in COMMON]
    cli_error_line(capsys, "merge", *ingredients, "--out", "out", "--resume", *other, "--quiet",
                   needles=["holds a previous ame-hf output", "--overwrite"], exit_code=1)
    assert snapshot(tmp_path / "out") == snapshot(reference) and not _staging(tmp_path)


# -- across machines: node ranks of torchrun sharing the output's folder ---------------------------------------

def _nodes(args: list, launcher: str, nodes: int = 2) -> list[subprocess.Popen]:
    """`torchrun --nnodes N --node_rank k` (or `accelerate launch --num_machines N --machine_rank k`) for each k,
    on 127.0.0.1: N machines, as far as ame-hf can tell."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launch = {
        "torchrun": lambda k: ["torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={k}", "--nproc_per_node=1",
                               "--master_addr=127.0.0.1", f"--master_port={port}"],
        "accelerate": lambda k: ["accelerate.commands.launch", "--multi_gpu", "--num_machines", str(nodes),
                                 "--machine_rank", str(k), "--main_process_ip", "127.0.0.1", "--main_process_port",
                                 str(port), "--num_processes", str(nodes), "--mixed_precision", "no",
                                 "--dynamo_backend", "no"],
    }[launcher]
    return [subprocess.Popen([sys.executable, "-m", *launch(k), "-m", "ame_hf", *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for k in range(nodes)]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_nodes_are_bit_identical_to_one_process(ingredients, reference, tmp_path, launcher):
    procs = _nodes(["merge", *ingredients, "--out", tmp_path / "out", *COMMON], launcher)
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    # Each node merged its own tensors (the units of the plan, split by bytes) into the one shared folder.
    assert "process 1 of 2" in errs[0] and "process 2 of 2" in errs[1] and " 0 tensor" not in errs[1]
    assert snapshot(tmp_path / "out") == snapshot(reference)
    assert not _staging(tmp_path)


def test_a_merge_two_nodes_started_is_finished_by_one_process(ingredients, tmp_path, monkeypatch):
    """Each node's tensors are recorded in its own journal file in the shared folder; a resume on one machine
    (say, after the job was preempted) keeps the work of both."""
    slow = [c if c != "40" else "400" for c in COMMON]  # about 0.25 s a tensor: both nodes are stopped part-way
    reference = tmp_path / "reference" / "out"
    assert main(["merge", *map(str, ingredients), "--out", str(reference), "--quiet", *slow]) == 0
    run = tmp_path / "run"  # as deep as the reference: the card records the ingredients relative to the output
    run.mkdir()
    procs = _nodes(["merge", *ingredients, "--out", run / "out", *slow], "torchrun")

    def both_recorded() -> bool:
        files = [f for s in _staging(run) for f in (s / JOURNAL_DIR).glob("done-*")]
        return len(files) == 2 and all(f.read_text().count("}") >= 1 for f in files)

    try:
        wait_for(both_recorded, timeout=300)
    finally:
        for p in procs:  # the torchrun agents and, below them, the merging processes
            subprocess.run(["pkill", "-KILL", "-P", str(p.pid)], check=False)
            p.kill()
            p.communicate(timeout=60)
    [staging] = _staging(run)
    assert len(_records(staging)) < len(json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"])
    monkeypatch.chdir(run)
    assert main(["merge", *map(str, ingredients), "--out", "out", "--resume", "--quiet", *slow]) == 0
    assert snapshot(run / "out") == snapshot(reference)
