"""The per-tensor streaming driver (ame_hf/streaming.py): processing tensors in blocks of rows changes no
value, and a merge's peak memory is bounded by a block, not by the tensor or the number of ingredients."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import ame_hf.plan as plan
from ame_hf import AmeConfig, merge
from factories import make_big_checkpoints, weights_sha256

ROWS = 400_000  # one 391 MiB float32 tensor (x 256 columns)


def test_slicing_changes_no_value(finetunes, tmp_path, monkeypatch):
    cfg = AmeConfig(optimizer="adam", relative_lr=0.05, epochs=2)
    whole = merge(finetunes, tmp_path / "whole", cfg, progress=False)
    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 100)  # every matrix now goes in several slices
    assert len(plan.row_blocks((64, 16))) > 1
    sliced = merge(finetunes, tmp_path / "sliced", cfg, progress=False)
    assert weights_sha256(whole.path) == weights_sha256(sliced.path)


# The child's own high-water mark (VmHWM of its address space). Not ru_maxrss: Python starts
# children with vfork, and Linux charges the parent's peak (here: pytest's) to the child at exec.
# The merge runs through the Python API, which leaves glibc's allocator as it is (the CLI lets glibc keep up to
# 64 MiB of freed blocks for reuse, `devices.keep_freed_memory`), and with glibc's mmap threshold fixed at
# 128 KiB (`MALLOC_MMAP_THRESHOLD_`): every block is then its own mapping, returned to the system when freed, so
# the high-water mark is what the code holds at once, not what the allocator chose to keep. Measured with the
# CLI instead, the freed blocks glibc kept made Adam's peak over the baseline 63-219 MiB from run to run (more
# under load: how the main and I/O threads' frees interleave decides it); this way 19 MiB (SGD) and 38 MiB (Adam)
# in every run, loaded machine or not, and 1.5 GiB over it when the tensor is processed whole.
_PEAK = """
import sys
import ame_hf
*paths, out, optimizer, max_memory = sys.argv[1:]
ame_hf.merge(paths, out, optimizer=optimizer, progress=False, device="cpu", max_memory=max_memory or None)
status = open("/proc/self/status").read()
print("PEAK_KB", next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


def _peak_mib(paths, out, optimizer, max_memory: str = "", **allocator: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "AME_HF_BLOCK_ELEMENTS"}
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    env.update(allocator)
    proc = subprocess.run([sys.executable, "-c", _PEAK, *map(str, [*paths, out, optimizer, max_memory])], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split("PEAK_KB")[1]) / 1024


@pytest.fixture(scope="module")
def big_and_tiny(tmp_path_factory):
    """3 checkpoints of one 391 MiB float32 tensor, and 3 of the same with 8 rows (the fixed cost)."""
    root = tmp_path_factory.mktemp("peak")
    return make_big_checkpoints(root / "big", 3, rows=ROWS), make_big_checkpoints(root / "tiny", 3, rows=8)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_peak_memory_is_bounded_by_a_slice(big_and_tiny, tmp_path, optimizer):
    big, tiny = big_and_tiny
    # Same code paths on a tiny tensor measure the fixed cost (interpreter, torch, optimizer). Each in a fresh
    # process: nothing an earlier test allocated counts.
    base = _peak_mib(tiny, tmp_path / "t", optimizer)
    peak = _peak_mib(big, tmp_path / "b", optimizer)
    tensor_mib = ROWS * 256 * 4 / 2**20
    # Whole-tensor processing would hold several copies (pivot, ingredient, grad, optimizer state):
    # 3-9 x 391 MiB. Streaming 4 MiB slices costs a fixed amount whatever the tensor's size (one block is read
    # ahead and one written behind), far below one copy.
    assert peak - base < 0.5 * tensor_mib, f"peak {peak:.0f} MiB vs baseline {base:.0f} MiB"


def test_peak_memory_stays_flat_when_blocks_come_from_the_heap(big_and_tiny, tmp_path):
    """The default merge (Adam, relative lr, mean pivot) with glibc serving blocks from its heap, as the CLI's
    allocator settings make it (`devices.keep_freed_memory`: mmap threshold 32 MiB), but trimming what is freed
    beyond 16 MiB, in one arena. A small tensor kept from every block (each block's row spreads, until the
    tensor's learning rate was known) was carved out of the block's freed memory, so the next block could not
    reuse it: the process grew with the tensor, 1.3 GB on a 3B model's embedding (peak 1.7 GB), here 29-143 MiB
    over the baseline from run to run (the threads' timing decides where glibc cuts), against 27-28 MiB now.
    With a 16 MiB --max-memory: the first blocks the spread pass keeps for the steps (`_keeping.kept_head`) take
    up to the budget whatever the tensor's size, and the default 128 MiB would hide the growth measured here."""
    big, tiny = big_and_tiny
    heap = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(16 * 2**20),
            "MALLOC_ARENA_MAX": "1", "AME_HF_BLOCK_ELEMENTS": str(1 << 18)}  # 1 MiB blocks: 391 of them
    base = _peak_mib(tiny, tmp_path / "t", "adam", "16MiB", **heap)
    tensor_mib = ROWS * 256 * 4 / 2**20
    for run in range(2):  # the growth showed in about 2 runs out of 3
        peak = _peak_mib(big, tmp_path / f"b{run}", "adam", "16MiB", **heap)
        assert peak - base < 0.15 * tensor_mib, f"run {run}: peak {peak:.0f} MiB vs baseline {base:.0f} MiB"


def test_each_input_byte_is_read_once_within_max_memory(tmp_path):
    """The default merge (Adam, relative lr: spread, mean pivot and steps) and 3 epochs read every
    ingredient byte once; with too little memory they read again, and write the same bytes."""
    from ame_hf import merge
    from factories import load_state, make_finetunes, weights_sha256

    paths = make_finetunes(tmp_path / "ft", n=3)
    inputs = sum(t.numel() * t.element_size() for p in paths for t in load_state(p).values())
    once = merge(paths, tmp_path / "once", epochs=3, shuffle=True, progress=False)
    assert once.bytes_read == inputs
    again = merge(paths, tmp_path / "again", epochs=3, shuffle=True, progress=False, max_memory=1024)
    assert again.bytes_read > 3 * inputs  # spread, mean pivot, 3 epochs: a pass each
    assert weights_sha256(once.path) == weights_sha256(again.path)
    soup = merge(paths, tmp_path / "soup", optimizer="sgd", progress=False)
    assert soup.bytes_read == inputs


def test_a_tensor_too_big_to_keep_keeps_its_first_blocks_and_reads_the_rest_again(tmp_path, caplog):
    """16 MiB tensors x 3 exceed a 44 MiB --max-memory, their 4 MiB blocks x 3 do not: the spread reads the
    tensor once and keeps its first block (12 MiB, beside the two blocks of 12 MiB and their 4 MiB means it
    computes at once) for the steps; the mean pivot and the steps share one more read of each other block. The
    bytes are the same.
    The merge says so in one line, with the budget that reads every byte once; that budget does."""
    import logging
    import re

    from ame_hf import merge
    from factories import make_big_checkpoints, weights_sha256

    paths = make_big_checkpoints(tmp_path / "big", n=3, rows=16384, cols=256)
    embed = 3 * 16384 * 256 * 4
    norm = 3 * 256 * 4
    with caplog.at_level(logging.INFO, logger="ame_hf"):
        whole = merge(paths, tmp_path / "whole", progress=False)
        assert whole.bytes_read == embed + norm and "read more than once" not in caplog.text
        blocks = merge(paths, tmp_path / "blocks", progress=False, max_memory=44 * 2**20)
    assert blocks.bytes_read == embed + embed * 3 // 4 + norm  # the last three of the four blocks are read again
    no_head = merge(paths, tmp_path / "no_head", progress=False, max_memory=24 * 2**20)
    assert no_head.bytes_read == 2 * embed + norm  # no room beside the spread's two blocks: all read again
    said = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    assert said[0] == ("1 tensor(s) were read more than once: their ingredient blocks exceed --max-memory (44MiB); "
                       "--max-memory 48MiB would read them once (holding up to that much for one tensor)"), said
    enough = merge(paths, tmp_path / "enough", progress=False, max_memory=re.search(r"--max-memory (\S+) would",
                                                                                     said[0])[1])
    assert enough.bytes_read == embed + norm
    tiny = merge(paths, tmp_path / "tiny", progress=False, max_memory=1024)
    assert tiny.bytes_read == 3 * embed + norm  # spread, mean pivot, steps: a pass each (norm: equal in all, lr 0)
    assert weights_sha256(whole.path) == weights_sha256(blocks.path) == weights_sha256(tiny.path)
    assert weights_sha256(enough.path) == weights_sha256(no_head.path) == weights_sha256(whole.path)


def test_without_a_relative_lr_a_tensor_too_big_to_keep_is_read_once_and_not_named(tmp_path, caplog):
    """AME-Adam at an absolute lr has no spread pass: its mean pivot and steps share one read of each block when
    the block's ingredients fit, so a tensor larger than --max-memory is read once and the closing line must not
    name it (it did: 'read more than once' for a tensor read once). With less than a block, each pass reads it."""
    import logging

    from factories import make_big_checkpoints

    paths = make_big_checkpoints(tmp_path / "big", n=3, rows=16384, cols=256)
    inputs = 3 * 16384 * 256 * 4 + 3 * 256 * 4
    with caplog.at_level(logging.INFO, logger="ame_hf"):
        once = merge(paths, tmp_path / "once", progress=False, max_memory="44MiB", optimizer="adam", lr=1e-4)
        assert once.bytes_read == inputs and "more than once" not in caplog.text
        tiny = merge(paths, tmp_path / "tiny", progress=False, max_memory="1KiB", optimizer="adam", lr=1e-4)
    assert tiny.bytes_read > inputs and "tensor(s) were read more than once" in caplog.text


@pytest.mark.parametrize("options", [{"pivot": "first"}, {"weights": [1.0, 2.0, 3.0]}, {"epochs": 2, "shuffle": True}],
                         ids=["pivot-first", "weighted", "2-epochs"])
def test_the_kept_first_blocks_change_no_byte(tmp_path, options):
    """A given pivot (read again), a weighted mean (recomputed from the kept blocks) and two epochs
    write the same bytes whether the tensor is kept whole, its first block is, or none is."""
    from factories import make_big_checkpoints, weights_sha256

    paths = make_big_checkpoints(tmp_path / "big", n=3, rows=16384, cols=256)
    embed = 3 * 16384 * 256 * 4
    digests, reads = [], []
    for budget in ("64MiB", "44MiB", "1KiB"):
        done = merge(paths, tmp_path / budget, progress=False, max_memory=budget, **options)
        digests.append(weights_sha256(done.path))
        reads.append(done.bytes_read)
    assert digests[0] == digests[1] == digests[2]
    assert reads[0] < reads[1] < reads[2]
    again = embed * 3 // 4 + (16384 * 256 * 4 if "pivot" in options else 0)  # and the given pivot (not kept)
    assert reads[1] - reads[0] == again


def test_the_read_again_line_names_a_budget_for_the_smallest_tensors_and_one_for_all(caplog):
    """3 x 3B bf16 (measured: 85 tensors): the MLP matrices need 144 MiB, the embedding 2254.5 MiB (rounded up)."""
    import logging
    from types import SimpleNamespace

    from ame_hf.merging import _say_read_again

    mlp, embed = 3 * 8192 * 3072 * 2, 3 * 128256 * 3072 * 2
    merger = SimpleNamespace(read_again={f"mlp.{i}": mlp for i in range(84)} | {"embed": embed},
                             max_memory=128 * 2**20)
    with caplog.at_level(logging.INFO, logger="ame_hf"):
        _say_read_again(merger, SimpleNamespace(rank=1, world=2))
        _say_read_again(SimpleNamespace(read_again={}, max_memory=1), SimpleNamespace(rank=0, world=1))
    assert caplog.messages == [
        "process 2 of 2: 85 tensor(s) were read more than once: their ingredient blocks exceed --max-memory (128MiB); "
        "--max-memory 144MiB would read 84 of them once, 2255MiB all (holding up to that much for one tensor)"]


def test_adapter_and_vocabulary_merges_do_not_depend_on_the_block_size(lm_adapters, tmp_path, monkeypatch):
    """The cut never shows (DESIGN §1): an adapter's delta and the token-row groups give the same bytes whole and
    in blocks of 100 elements, for the soup and for Adam."""
    import torch

    from factories import build_base, tiny_tokenizer

    refs = [*lm_adapters["adapters"], lm_adapters["full"]]
    vocab = []
    for i, added in enumerate([[], ["<new>", "<x>"]]):  # a fine-tune that added tokens, one that did not
        tok = tiny_tokenizer()
        tok.add_tokens(added)
        model = build_base("llama", vocab_size=len(tiny_tokenizer()))
        model.resize_token_embeddings(len(tok))
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
        model.save_pretrained(tmp_path / f"vocab{i}")
        tok.save_pretrained(tmp_path / f"vocab{i}")
        vocab.append(tmp_path / f"vocab{i}")
    for name, cfg, inputs in (("soup", AmeConfig(optimizer="sgd", pivot="base"), refs),
                              ("adam", AmeConfig(relative_lr=0.05, pivot="base"), refs),
                              ("vocab-adam", AmeConfig(relative_lr=0.05), vocab)):
        monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 1 << 20)
        seen = []
        whole = merge(inputs, tmp_path / f"{name}-whole", cfg, progress=False, callback=lambda *a: seen.append(a))
        assert seen[-1][0] == seen[-1][1] == max(done for done, _ in seen), (name, seen[-1])  # the bar ends at its total
        monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 100)
        sliced = merge(inputs, tmp_path / f"{name}-sliced", cfg, progress=False)
        assert weights_sha256(whole.path) == weights_sha256(sliced.path), name


def test_blocks_are_written_in_a_thread_of_their_own(tmp_path, monkeypatch):
    """Reads and writes each have a thread: a slow write (the page cache's fresh pages, the journal's sha256)
    does not hold up the next block's read. Every block is written by the writer thread, and the reads started
    ahead of the steps are made by the I/O thread, never by the writer."""
    import threading

    import ame_hf.streaming as streaming
    from factories import make_finetunes

    paths = make_finetunes(tmp_path / "ft", n=3)
    writers, readers = set(), set()
    write_rows, read = streaming.write_rows, streaming.TensorMerger._read

    def recorded_write(*args, **kwargs):
        writers.add(threading.current_thread().name.rsplit("_", 1)[0])
        return write_rows(*args, **kwargs)

    def recorded_read(self, *args, **kwargs):
        readers.add(threading.current_thread().name.rsplit("_", 1)[0])
        return read(self, *args, **kwargs)

    monkeypatch.setattr(streaming, "write_rows", recorded_write)
    monkeypatch.setattr(streaming.TensorMerger, "_read", recorded_read)
    merge(paths, tmp_path / "soup", optimizer="sgd", progress=False)
    assert writers == {"ame-hf-write"}
    assert "ame-hf-io" in readers and "ame-hf-write" not in readers
