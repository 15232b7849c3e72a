"""Devices (ame_hf/devices.py), the CUDA path: same results as the CPU (to rounding), fused kernels, bounded
GPU memory, and a clear refusal of more processes than GPUs.

These tests need a CUDA GPU. CI has none, so there they are reported as skipped (never as passed);
they were run on a lent H200 machine (see the README, "Scale").
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ame_hf
import ame_hf.plan as plan
from ame_hf.config import AmeConfig
from ame_hf.engine import device_defaults
from factories import load_state, make_big_checkpoints, make_finetunes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


def _mean(paths) -> dict[str, torch.Tensor]:
    states = [load_state(p) for p in paths]
    return {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}


@pytest.fixture
def small_slices(monkeypatch):
    """Slices small enough that the GPU path (16x larger slices) still cuts tensors into several."""
    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 64)


def test_default_device_is_the_gpu(tmp_path):
    paths = make_finetunes(tmp_path / "ft", n=2)
    result = ame_hf.merge(paths, tmp_path / "out", optimizer="sgd", progress=False)
    assert result.device.startswith("cuda")


def test_soup_on_gpu_equals_cpu_and_the_mean(tmp_path, small_slices):
    paths = make_finetunes(tmp_path / "ft", n=4)
    gpu = load_state(ame_hf.merge(paths, tmp_path / "gpu", optimizer="sgd", device="cuda", progress=False).path)
    cpu = load_state(ame_hf.merge(paths, tmp_path / "cpu", optimizer="sgd", device="cpu", progress=False).path)
    mean = _mean(paths)
    assert gpu.keys() == cpu.keys() == mean.keys()
    for name in mean:
        assert gpu[name].dtype == torch.float32
        assert (gpu[name].double() - mean[name]).abs().max() <= 1e-6, name
        assert (gpu[name] - cpu[name]).abs().max() <= 1e-6, name


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "adagrad", "rmsprop"])
def test_optimizers_on_gpu_match_cpu(tmp_path, small_slices, optimizer):
    paths = make_finetunes(tmp_path / "ft", n=3)
    opts = dict(optimizer=optimizer, epochs=2, shuffle=True, seed=3, progress=False)
    gpu = load_state(ame_hf.merge(paths, tmp_path / "gpu", device="cuda", **opts).path)
    cpu = load_state(ame_hf.merge(paths, tmp_path / "cpu", device="cpu", **opts).path)
    mean = _mean(paths)
    moved = 0.0
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, float((cpu[name].double() - mean[name]).abs().max()))
    assert moved > 1e-5  # AME really moved away from the soup, so the comparison means something


def test_bf16_ingredients_on_gpu(tmp_path, small_slices):
    paths = make_finetunes(tmp_path / "ft", n=3, dtype=torch.bfloat16)
    gpu = load_state(ame_hf.merge(paths, tmp_path / "gpu", optimizer="sgd", device="cuda", progress=False).path)
    mean = _mean(paths)
    for name, value in gpu.items():
        assert value.dtype == torch.bfloat16
        # One bf16 rounding step, plus float32 noise where the exact mean is 0.
        step = torch.finfo(torch.bfloat16).eps * mean[name].abs() + 1e-6
        assert bool(((value.double() - mean[name]).abs() <= step).all()), name


def test_fused_kernels_on_cuda():
    cuda = torch.device("cuda")
    for name in ("adam", "adamw", "sgd"):
        assert device_defaults(AmeConfig(optimizer=name).resolved(), cuda) == {"fused": True}, name
    # The user's own choice wins.
    assert device_defaults(AmeConfig(optimizer="adam", optimizer_args={"foreach": True}).resolved(), cuda) == {}


def test_cli_merge_on_cuda(tmp_path, capsys):
    from ame_hf.cli import main

    paths = make_finetunes(tmp_path / "ft", n=2)
    assert main(["merge", *map(str, paths), "--out", str(tmp_path / "out"), "--device", "cuda:0", "--quiet"]) == 0
    loaded = load_state(tmp_path / "out")
    mean = _mean(paths)
    assert max(float((loaded[k].double() - mean[k]).abs().max()) for k in mean) < 1e-3  # default AME stays near


def test_gpu_memory_is_bounded_by_a_slice(tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 1 << 18)  # GPU slices of 4 Mi elements (16 MiB)
    rows, cols = 400_000, 256  # one 391 MiB float32 tensor
    paths = make_big_checkpoints(tmp_path, 3, rows=rows, cols=cols)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ame_hf.merge(paths, tmp_path / "out", optimizer="adam", device="cuda", progress=False)
    peak = torch.cuda.max_memory_allocated() - before
    # Whole-tensor Adam would hold pivot, weights, gradient, two moments and an ingredient: 6 x 391 MiB.
    # By slices: about 8 x 16 MiB.
    assert peak < 0.5 * rows * cols * 4, f"peak GPU memory {peak / 2**20:.0f} MiB"


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="checks the refusal on a one-GPU machine")
def test_more_processes_than_gpus_is_refused(tmp_path):
    paths = make_finetunes(tmp_path / "ft", n=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ame_hf", "merge", *map(str, paths), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "launched 2 processes on this machine but it has 1 CUDA device(s)" in proc.stderr
    assert "--device cpu" in proc.stderr and "device=" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_lm_scoring_on_the_gpu_equals_the_cpu(lm_experts):
    """text-generation scoring (`evaluate`, `tune`) runs on the GPU by default when there is one: same
    per-token loss as on the CPU (to float rounding), same token count."""
    from ame_hf.evaluation import load_data
    from ame_hf.lm_evaluation import mean_token_nll

    experts, val, _ = lm_experts
    data = load_data(val, "text-generation")
    cpu, n_cpu = mean_token_nll(str(experts[0]), data, batch_size=4, device="cpu")
    gpu, n_gpu = mean_token_nll(str(experts[0]), data, batch_size=4)  # the default device: CUDA here
    assert n_gpu == n_cpu
    assert abs(gpu - cpu) <= 1e-4 * max(1.0, abs(cpu))
    scored = ame_hf.evaluate([experts[0]], data=val, task="text-generation", device="cuda")
    assert abs(scored.scores[0][1] - cpu) <= 1e-4 * max(1.0, abs(cpu))
