"""The relative learning rate's spread and the mean pivot (ame_hf/spread.py): computed in the blocks' dtype, they
stay within 1e-6 relative of a float64 computation, give the same float however a tensor is cut into blocks, and
the mean is the float64 mean rounded once; bfloat16 blocks kept in their stored dtype change no byte."""

from __future__ import annotations

import math

import pytest
import torch

from ame_hf import merge
from ame_hf.plan import row_blocks
from ame_hf.spread import mean_of, relative_lr_value, row_spreads, spread_sum, spread_total, squared_distance
from factories import make_big_checkpoints, weights_sha256


def _ingredients(shape, n, *, offset, scale, seed=0):
    """Ingredients far from zero (`offset`) that differ by little (`scale`): where a float32 sum of squares
    minus the square of a sum would lose every digit."""
    g = torch.Generator().manual_seed(seed)
    base = offset + torch.randn(shape, generator=g)
    return [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


def _reference(xs, pivot):
    """float64 throughout: the summed squared distance of the ingredients to the pivot."""
    return math.fsum(float(((x.double() - pivot.double()) ** 2).sum()) for x in xs)


@pytest.mark.parametrize("shape", [(4096, 768), (300, 65536), (1_000_003,), (7, 3, 5), ()])
@pytest.mark.parametrize("scale", [1e-2, 1e-4])
def test_spread_is_within_1e_6_of_float64(shape, scale):
    xs = _ingredients(shape, 4, offset=3.0, scale=scale)
    pivot, spread = spread_sum(xs.__getitem__, 4, None)
    assert torch.equal(pivot, (sum(x.double() for x in xs) / 4).float())  # the mean the merge starts from
    reference = _reference(xs, pivot)
    assert abs(spread - reference) <= 1e-6 * reference
    given = xs[2] + scale  # a pivot of its own (a base model)
    assert abs(spread_sum(xs.__getitem__, 4, given)[1] - _reference(xs, given)) <= 1e-6 * _reference(xs, given)


def test_spread_in_float64_is_float64():
    xs = [x.double() for x in _ingredients((64, 33), 3, offset=1.0, scale=1e-3)]
    pivot, spread = spread_sum(xs.__getitem__, 3, None)
    assert pivot.dtype == torch.float64
    assert abs(spread - _reference(xs, pivot)) <= 1e-12 * _reference(xs, pivot)


@pytest.mark.parametrize("shape", [(1000, 37), (5000,)])
def test_the_spread_does_not_depend_on_the_blocks(shape):
    """The cut never shows: per-row sums added exactly once give one float, whatever the block size."""
    xs = _ingredients(shape, 3, offset=0.5, scale=1e-3, seed=1)
    totals = set()
    for elements in (10**9, 4096, 999, 37):
        parts = []
        for rows in row_blocks(shape, elements):
            block = [x if rows is None else x[rows[0]:rows[1]] for x in xs]
            parts.append(row_spreads(block.__getitem__, 3, None)[1])
        totals.add(spread_total(parts))
    assert len(totals) == 1


@pytest.mark.parametrize("shape", [(512, 2048), (3, 65536), (2, 65537), (64, 2049), (7, 3, 5), (1_000_003,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_distances_computed_in_the_means_chunks_are_those_of_the_whole_block(shape, dtype, threads):
    """row_spreads computes the distances to the mean chunk by chunk, inside the mean's loop: bit for bit the
    row sums of `squared_distance` over the whole block (added in float64 in order), with one or two threads
    (a last chunk of one row, whose sum threads would split, is taken by the chunk before)."""
    xs = [x.to(dtype) for x in _ingredients(shape, 3, offset=1.0, scale=1e-3, seed=3)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pivot, rows = row_spreads(xs.__getitem__, 3, None, torch.float32)
        buffer = torch.empty_like(pivot)
        expected = squared_distance(xs[0].float(), pivot, buffer).double()
        for x in xs[1:]:
            expected += squared_distance(x.float(), pivot, buffer)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(pivot, mean_of(xs.__getitem__, 3, torch.float32))
    assert rows.dtype == torch.float64 and torch.equal(rows, expected)


def test_the_mean_is_the_float64_mean_rounded_once_and_exact_where_all_agree():
    xs = _ingredients((3, 200_000), 5, offset=0.0, scale=1.0, seed=2)
    for x in xs[1:]:
        x[0] = xs[0][0]  # the first row agrees in all
    mean = mean_of(xs.__getitem__, 5)
    assert torch.equal(mean, (sum(x.double() for x in xs) / 5).float())
    assert torch.equal(mean[0], xs[0][0])
    assert relative_lr_value(0.5, spread_sum(([xs[0][0]] * 3).__getitem__, 3, None)[1], 3) == 0.0


def test_bfloat16_blocks_kept_in_their_dtype_are_read_once_and_change_no_byte(tmp_path):
    """3 x 8 MiB of float32 exceed a 16 MiB --max-memory, the same blocks kept in bfloat16 (12 MiB) do not."""
    paths = make_big_checkpoints(tmp_path / "big", n=3, rows=8192, cols=256, dtype=torch.bfloat16)
    embed, norm = 3 * 8192 * 256 * 2, 3 * 256 * 2
    whole = merge(paths, tmp_path / "whole", progress=False, device="cpu")
    assert whole.bytes_read == embed + norm
    kept = merge(paths, tmp_path / "kept", progress=False, device="cpu", max_memory=16 * 2**20)
    assert kept.bytes_read == embed + norm
    assert weights_sha256(whole.path) == weights_sha256(kept.path)


def test_bfloat16_blocks_are_kept_as_stored_where_only_that_leaves_room_for_the_pivots(tmp_path):
    """3 x 8 MiB of float32 fit a 28 MiB --max-memory but not beside the 8 MiB float32 pivots; kept in bfloat16
    (12 MiB) they do, so the mean is computed once and less is kept (3 x 3B bf16 q_proj: peak RSS 425-458 ->
    385-393 MiB); read once, the same bytes."""
    from ame_hf._keeping import Keeping, keeping
    from ame_hf.checkpoint import Checkpoint
    from ame_hf.plan import tensor_blocks

    paths = make_big_checkpoints(tmp_path / "big", n=3, rows=8192, cols=256, dtype=torch.bfloat16)
    ckpts = [Checkpoint(p) for p in paths]
    name = next(k for k in ckpts[0].tensors if ckpts[0].info(k).numel == 8192 * 256)
    blocks = tensor_blocks((8192, 256), torch.device("cpu"))
    assert keeping(ckpts, name, blocks, 2, torch.float32, 28 * 2**20, relative=True) == Keeping({}, {}, torch.bfloat16)
    # Without a relative lr there are no pivots to keep: the float32 blocks fit and are kept as computed.
    kept = keeping(ckpts, name, blocks, 2, torch.float32, 28 * 2**20, relative=False)
    assert kept == Keeping({}, None, torch.float32)
    whole = merge(paths, tmp_path / "whole", progress=False, device="cpu")
    kept_bf16 = merge(paths, tmp_path / "kept", progress=False, device="cpu", max_memory=28 * 2**20)
    assert kept_bf16.bytes_read == whole.bytes_read == 3 * 8192 * 256 * 2 + 3 * 256 * 2
    assert weights_sha256(whole.path) == weights_sha256(kept_bf16.path)


@pytest.mark.parametrize("row", [0, 4095])
def test_a_nan_in_a_block_of_either_thread_stops_the_default_merge_naming_its_ingredient(tmp_path, monkeypatch, row):
    """The spread pass reads and computes blocks in the main thread and in the I/O thread (`_spread_pass`): a NaN
    in the first or the last of 64 blocks is refused with the culprit named, and nothing is left at --out."""
    from safetensors.torch import load_file, save_file

    from ame_hf import plan
    from ame_hf.errors import CheckpointError

    paths = make_big_checkpoints(tmp_path / "big", n=3, rows=4096, cols=64)
    weights = load_file(paths[2] / "model.safetensors")
    weights["embed.weight"][row, 5] = float("nan")
    save_file(weights, paths[2] / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 64 * 64)
    with pytest.raises(CheckpointError, match="embed.weight.*NaN or Inf") as caught:
        merge(paths, tmp_path / "out", progress=False, device="cpu")
    assert str(paths[2]) in str(caught.value) and not (tmp_path / "out").exists()
