"""Task-vector transforms (ame_hf/transforms.py): TIES, DARE and breadcrumbs against an independent whole-tensor
float64 implementation of mergekit's formulas; composed with other optimizers; no byte depends on the block size."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ame_hf import AmeConfig, merge, plan
from ame_hf.errors import InvalidConfigError
from ame_hf.transforms import keep_mask, kth_largest
from factories import load_state, make_finetunes, save_base
from test_engine import reference_ame_states


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf")
    return save_base(root / "base"), make_finetunes(root, n=3, scale=0.05)


def floats(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


def reference_deltas(name, base, xs, transform, density, weights, *, gamma=0.01, rescale=None, seed=0):
    """Each ingredient's sparsified, rescaled task vector, whole tensor, float64 (the DARE mask is the documented
    hash, `keep_mask`; everything else is computed here)."""
    out = []
    for i, x in enumerate(xs):
        d = x.double() - base.double()
        dens = density[i] if isinstance(density, list) else density
        flat = d.abs().reshape(-1)
        keep = torch.ones_like(d, dtype=torch.bool)
        if dens < 1 and transform in ("ties",):
            k = max(1, int(dens * d.numel()))
            keep = d.abs() >= flat.sort(descending=True).values[k - 1]
        elif dens < 1 and transform in ("dare", "dare_ties"):
            keep = keep_mask(seed, name, i, 0, d.numel(), dens).reshape(d.shape)
        elif dens < 1 and transform.startswith("breadcrumbs"):
            n_el = d.numel()
            target, top = int(dens * n_el), int(gamma * n_el)
            bottom = max(0, n_el - target - top)
            ranked = flat.sort().values
            keep = (d.abs() >= ranked[bottom]) & (d.abs() <= ranked[bottom + target - 1])
        kept = d * keep
        mode = rescale or ("density" if transform.startswith("dare") else "none")
        if dens < 1 and mode == "density":
            kept = kept / dens
        elif dens < 1 and mode == "l1" and kept.abs().sum() > 1e-7:
            kept = kept * (d.abs().sum() / kept.abs().sum())
        out.append(kept)
    return out


def reference_merge(name, base, xs, transform, density, weights, *, normalize=True, lam=1.0, **kw):
    """mergekit 0.1.5's generalized task arithmetic, in float64."""
    deltas = torch.stack(reference_deltas(name, base, xs, transform, density, weights, **kw))
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * base.dim()))
    weighted = deltas * w
    if transform in ("ties", "dare_ties", "breadcrumbs_ties"):
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
        mask = weighted.sign() == majority
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), w.sum(0)
    if normalize:
        mixed = mixed / divisor
    return base.double() + lam * mixed


CASES = [
    ("ties", 0.4, [1.0, 1.0, 1.0], {}),
    ("ties", [0.3, 0.6, 0.9], [0.5, 0.3, 0.2], {}),
    ("ties", 0.5, [1.0, 2.0, 1.0], {"normalize": False}),
    ("dare", 0.5, [1.0, 1.0, 1.0], {}),
    ("dare", 0.5, [1.0, 0.5, 1.0], {"normalize": False}),
    ("dare_ties", 0.7, [0.6, 0.3, 0.1], {"rescale": "l1", "seed": 3}),
    ("breadcrumbs", 0.8, [1.0, 1.0, 1.0], {"gamma": 0.05}),
    ("breadcrumbs_ties", 0.6, [1.0, 0.5, 1.0], {}),
]


@pytest.mark.parametrize("transform,density,weights,extra", CASES)
def test_transform_equals_the_whole_tensor_float64_reference(models, tmp_path, transform, density, weights, extra):
    base, paths = models
    # mergekit's merge in AME terms: one SGD step from the base, batch = all, constant lr.
    extra = dict(extra)
    normalize = extra.pop("normalize", True)
    if not normalize and transform.endswith("ties"):
        extra["disjoint_sum"] = True
    lr = 1.0 if normalize else sum(weights)  # normalize: false sums the task vectors: lr = the weights' sum
    cfg = AmeConfig(optimizer="sgd", lr=lr, schedule="constant", batch_size=3, pivot=str(base), transform=transform,
                    density=density, weights=weights, **extra)
    out = floats(load_state(merge(paths, tmp_path / "out", cfg, progress=False).path))
    b, states = load_state(base), [load_state(p) for p in paths]
    kw = {k: v for k, v in extra.items() if k in ("gamma", "rescale", "seed")}
    worst = max(float((out[k].double() - reference_merge(k, b[k], [s[k] for s in states], transform, density, weights,
                                                         normalize=normalize, **kw)).abs().max()) for k in out)
    assert worst <= 1e-6
    mean = {k: sum(s[k].double() for s in states) / 3 for k in out}
    assert max(float((out[k].double() - mean[k]).abs().max()) for k in out) > 1e-3  # not the soup


def test_adam_on_ties_task_vectors_equals_the_whole_model_reference(models, tmp_path):
    base, paths = models
    cfg = AmeConfig(optimizer="adam", lr=0.01, epochs=2, pivot=str(base), transform="ties", density=0.5)
    out = floats(load_state(merge(paths, tmp_path / "out", cfg, progress=False).path))
    b, states = load_state(base), [load_state(p) for p in paths]
    transformed = [{} for _ in states]
    for k in out:
        deltas = reference_deltas(k, b[k], [s[k] for s in states], "ties", 0.5, [1.0] * 3)
        stacked = torch.stack(deltas)
        majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
        mask = stacked.sign() == majority
        agreeing = mask.double().sum(0)
        agreeing[agreeing == 0] = 1
        for i, d in enumerate(deltas):
            transformed[i][k] = (b[k].double() + d * mask[i] * 3 / agreeing).float()
    ref = reference_ame_states(transformed, cfg, pivot_state=b)
    assert max(float((out[k].double() - ref[k].double()).abs().max()) for k in out) <= 1e-6


@pytest.mark.parametrize("transform", ["ties", "dare_ties", "breadcrumbs"])
def test_no_byte_depends_on_the_block_size(models, tmp_path, monkeypatch, transform):
    base, paths = models
    cfg = AmeConfig(optimizer="adam", relative_lr=0.05, pivot=str(base), transform=transform, density=0.3,
                    rescale="l1", weights=[3, 1, 2])
    whole = load_state(merge(paths, tmp_path / "whole", cfg, progress=False).path)
    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 150)  # every matrix in many blocks
    cut = load_state(merge(paths, tmp_path / "cut", cfg, progress=False).path)
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_kth_largest_is_exact_and_the_dare_mask_keeps_the_density(tmp_path):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = (torch.randn(5000, generator=g, dtype=dtype) * 10.0 ** torch.randint(-8, 3, (5000,), generator=g)).abs()
        x[:20] = x[20]  # ties
        for k in (1, 7, 2500, 5000):
            assert kth_largest(lambda: iter(x.split(333)), k, dtype) == float(x.sort(descending=True).values[k - 1])
    mask = keep_mask(1, "model.layers.0.mlp.up_proj.weight", 2, 0, 1_000_000, 0.3)
    assert abs(float(mask.double().mean()) - 0.3) < 3 * math.sqrt(0.3 * 0.7 / 1e6)
    other = keep_mask(1, "model.layers.0.mlp.up_proj.weight", 1, 0, 1_000_000, 0.3)
    assert abs(float((mask & other).double().mean()) - 0.09) < 0.003  # ingredients' masks are independent


def test_transform_options_are_checked(models, tmp_path):
    base, paths = models
    with pytest.raises(InvalidConfigError, match="task vectors"):
        AmeConfig(transform="ties")
    with pytest.raises(InvalidConfigError, match="only apply with a transform"):
        AmeConfig(density=0.5)
    with pytest.raises(InvalidConfigError, match="density"):
        AmeConfig(transform="dare", pivot="base", density=1.5)
    with pytest.raises(InvalidConfigError, match="2 values of density for 3 ingredients"):
        merge(paths, tmp_path / "x", pivot=str(base), transform="ties", density=[0.5, 0.5], progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("transform, rescale, reads, base_reads",
                         [("dare", None, (1, 2), (1, 2)), ("ties", "l1", (2, 5), (2, 11))])
def test_the_passes_keep_what_fits_max_memory(models, tmp_path, monkeypatch, transform, rescale, reads,
                                              base_reads):
    """Within --max-memory, the first pass keeps one ingredient's |task vector| for its radix select and L1 norm
    (TIES: read once there instead of 2 + 1 times in float32), and a relative lr's spread pass keeps the
    transformed blocks for the steps (read once instead of twice; DARE has no first pass); with less, the spread
    pass keeps the first blocks that fit. The pivot (the base) is read once per block and pass, not once per
    ingredient (in the first pass, where its blocks fit beside one task vector, else beside each ingredient). The
    bytes written are the same."""
    from collections import Counter

    from ame_hf.checkpoint import Checkpoint
    from factories import weights_sha256

    base, paths = models
    cfg = AmeConfig(optimizer="adam", relative_lr=0.05, pivot=str(base), transform=transform, density=0.5,
                    rescale=rescale)
    read, counted = Checkpoint.read, Counter()

    def counting(self, name, rows=None, dtype=None):  # the real read, its values counted per tensor and source
        values = read(self, name, rows, dtype)
        counted[name, Path(self.path) == Path(base)] += values.numel() * self.info(name).dtype.itemsize
        return values

    monkeypatch.setattr(Checkpoint, "read", counting)
    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 3 * 64)  # blocks of 64 elements: many per matrix
    state = load_state(paths[0])
    name = max((k for k in state if state[k].dim() == 2), key=lambda k: state[k].numel())
    once = sum(load_state(p)[name].numel() * 4 for p in paths)
    shas, got = {}, {}
    for budget in ("128MiB", "4KiB", "1B"):
        counted.clear()
        shas[budget] = weights_sha256(merge(paths, tmp_path / budget, cfg, progress=False, max_memory=budget).path)
        got[budget] = counted[name, False], counted[name, True]
    least, most = reads
    base = once // len(paths)
    assert got["128MiB"] == (least * once, base_reads[0] * base), (got, once)
    assert got["1B"] == (most * once, base_reads[1] * base), (got, once)
    assert least * once < got["4KiB"][0] < most * once, (got, once)  # the first blocks kept
    assert shas["128MiB"] == shas["4KiB"] == shas["1B"]
