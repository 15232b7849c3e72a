"""AME semantics (ame_hf/engine.py, DESIGN §1): the soup special case, agreement with an independent
whole-model reference for every optimizer, determinism and dtypes (blocks of rows: tests/test_streaming.py)."""

from __future__ import annotations

import math

import pytest
import torch

from ame_hf import AmeConfig, merge
from ame_hf.engine import ingredient_order, step_lrs
from ame_hf.optimizers import OPTIMIZERS, optimizer_class
from factories import load_state, make_finetunes, save_base, weights_sha256


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base") / "base")


def independent_mean(paths):
    states = [load_state(p) for p in paths]
    return {k: torch.stack([s[k].double() for s in states]).mean(0) for k in states[0]}


def max_abs_diff(a, b):
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("epochs", [1, 3])
@pytest.mark.parametrize("pivot", ["mean", "first", 2, "BASE"])
def test_soup_is_exact_mean(finetunes, base_dir, tmp_path, batch_size, epochs, pivot):
    pivot = str(base_dir) if pivot == "BASE" else pivot
    cfg = AmeConfig.soup(epochs=epochs, pivot=pivot)
    result = merge(finetunes, tmp_path / "out", cfg, batch_size=batch_size, progress=False)
    assert max_abs_diff(load_state(result.path), independent_mean(finetunes)) <= 1e-6


def test_soup_with_three_ingredients_and_batch_two_uses_count_weighting(tmp_path):
    # 3 ingredients, B=2: batches of 2 and 1; a wrong (1/t) weighting would miss the mean.
    paths = make_finetunes(tmp_path / "ft", n=3, scale=0.1)
    result = merge(paths, tmp_path / "out", AmeConfig.soup(batch_size=2), progress=False)
    assert max_abs_diff(load_state(result.path), independent_mean(paths)) <= 1e-6


def reference_ame(paths, config: AmeConfig, pivot_path=None):
    """All floating tensors as ONE torch.optim instance (independent of the streaming engine)."""
    return reference_ame_states([load_state(p) for p in paths], config, load_state(pivot_path) if pivot_path else None)


def reference_ame_states(states, config: AmeConfig, pivot_state=None):
    """`reference_ame` over state dicts (e.g. what transformers loads); a pivot state lacking a tensor starts it
    from the mean."""
    cfg = config.resolved()
    names = sorted(k for k in states[0] if states[0][k].is_floating_point())
    mean = {k: (sum(s[k].double() for s in states) / len(states)).float() for k in names}
    if cfg.pivot == "mean":
        start = mean
    else:
        src = pivot_state if pivot_state is not None else states[0 if cfg.pivot == "first" else cfg.pivot]
        start = {k: src[k].float() if k in src else mean[k] for k in names}
    params = [start[k].clone() for k in names]
    if cfg.relative_lr is not None:
        lrs = [cfg.relative_lr * math.sqrt(sum(float(((s[k].double() - start[k].double()) ** 2).sum()) for s in states)
                                           / (len(states) * states[0][k].numel())) for k in names]
    else:
        lrs = [cfg.lr] * len(names)
    opt = optimizer_class(cfg.optimizer)([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)],
                                         **dict(cfg.optimizer_args))
    order = ingredient_order(len(states), cfg.epochs, shuffle=cfg.shuffle, seed=cfg.seed, order=cfg.order)
    factors = iter(step_lrs(order, cfg.batch_size, 1.0, cfg.schedule))
    for epoch in order:
        for b in range(0, len(epoch), cfg.batch_size):
            batch = epoch[b:b + cfg.batch_size]
            factor = next(factors)
            for p, k in zip(params, names):
                p.grad = p - sum(states[i][k].float() for i in batch) / len(batch)
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * factor
            opt.step()
    return dict(zip(names, params))


def _floats(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_streaming_equals_whole_model_reference(finetunes, tmp_path, name):
    cfg = AmeConfig(optimizer=name, lr=0.05, epochs=2, batch_size=1, pivot="mean")
    result = merge(finetunes, tmp_path / "out", cfg, progress=False)
    assert max_abs_diff(_floats(load_state(result.path)), reference_ame(finetunes, cfg)) <= 1e-6


@pytest.mark.parametrize("options", [
    dict(optimizer="adam", relative_lr=0.1, pivot="first", shuffle=True, seed=3, epochs=2),
    dict(optimizer="sgd", lr=0.7, schedule="constant", optimizer_args={"momentum": 0.9, "nesterov": True}),
    dict(optimizer="adamw", lr=0.01, batch_size=2, optimizer_args={"betas": [0.8, 0.99], "weight_decay": 0.1}),
    dict(optimizer="adam", lr=0.05, order="reverse"),
    dict(optimizer="adam", lr=0.05, order=[2, 0, 3, 1], epochs=2),
    dict(optimizer="rmsprop", lr=0.05, order=[1, 3, 2, 0], shuffle=True, seed=5, epochs=2),
])
def test_streaming_equals_reference_with_options(finetunes, tmp_path, options):
    cfg = AmeConfig(**options)
    result = merge(finetunes, tmp_path / "out", cfg, progress=False)
    assert max_abs_diff(_floats(load_state(result.path)), reference_ame(finetunes, cfg)) <= 1e-6


def test_default_is_real_ame_not_the_soup(finetunes, tmp_path):
    cfg = AmeConfig()
    assert not cfg.is_soup and cfg.resolved().relative_lr is not None
    out = load_state(merge(finetunes, tmp_path / "out", progress=False).path)
    mean = independent_mean(finetunes)
    assert max_abs_diff(out, mean) > 1e-4  # moved away from the soup
    assert max_abs_diff(_floats(out), reference_ame(finetunes, cfg)) <= 1e-6


def test_same_seed_same_bytes_and_other_seed_other_order(finetunes, tmp_path):
    cfg = AmeConfig(optimizer="adam", lr=0.01, shuffle=True, seed=7, epochs=3)
    a = merge(finetunes, tmp_path / "a", cfg, progress=False)
    b = merge(finetunes, tmp_path / "b", cfg, progress=False)
    assert weights_sha256(a.path) == weights_sha256(b.path)
    assert a.order == b.order and len(a.order) == 3
    assert ingredient_order(4, 3, shuffle=True, seed=8) != a.order


def test_bf16_ingredients_stay_bf16_and_match_reference(tmp_path):
    paths = make_finetunes(tmp_path / "ft", n=3, dtype=torch.bfloat16, scale=0.05)
    cfg = AmeConfig(optimizer="adagrad", lr=0.05)
    out = load_state(merge(paths, tmp_path / "out", cfg, progress=False).path)
    assert all(v.dtype == torch.bfloat16 for v in out.values() if v.is_floating_point())
    ref = reference_ame(paths, cfg)
    # The reference is float32; the output is its bf16 rounding.
    assert max_abs_diff(_floats(out), {k: v.to(torch.bfloat16) for k, v in ref.items()}) == 0


def test_explicit_output_dtype_and_float64_compute(finetunes, tmp_path):
    result = merge(finetunes, tmp_path / "out", AmeConfig.soup(dtype="float16", compute_dtype="float64"),
                   progress=False)
    out = load_state(result.path)
    assert {v.dtype for v in out.values()} == {torch.float16}
    mean = independent_mean(finetunes)
    assert max_abs_diff(out, {k: v.half() for k, v in mean.items()}) == 0


def test_ingredient_order_given_reverse_a_permutation_and_shuffled():
    """`order` is the order of every epoch; `shuffle` permutes its positions per epoch (given + shuffle is the
    shuffle of before), so reverse + shuffle is the reversal of given + shuffle, element by element."""
    from ame_hf.errors import InvalidConfigError

    assert ingredient_order(3, 2, order="reverse") == [[2, 1, 0], [2, 1, 0]]
    assert ingredient_order(3, 1, order=[1, 2, 0]) == [[1, 2, 0]]
    shuffled = ingredient_order(5, 3, shuffle=True, seed=4)
    assert shuffled == ingredient_order(5, 3, shuffle=True, seed=4, order="given")
    assert ingredient_order(5, 3, shuffle=True, seed=4, order="reverse") == [[4 - i for i in e] for e in shuffled]
    with pytest.raises(InvalidConfigError, match="not a permutation"):
        ingredient_order(3, 1, order=[0, 1])
    with pytest.raises(InvalidConfigError, match="each ingredient index once"):
        AmeConfig(order="0,0,1")
    assert AmeConfig(order="2, 0, 1").order == [2, 0, 1] and AmeConfig(order="REVERSE").order == "reverse"


def test_merge_order_reverse_is_recorded_and_reproduced(llamas, tmp_path, capsys):
    """`merge --order 2,0,1` runs in that order, records it in ame_config.yaml and the card's Reproduce
    command, and `--config` of that file gives the same bytes; the reversed order differs from the given."""
    import yaml
    from huggingface_hub import ModelCard

    from ame_hf.cli import main

    out = tmp_path / "perm"
    assert main(["merge", *map(str, llamas), "--out", str(out), "--order", "2,0,1", "--quiet"]) == 0
    run = yaml.safe_load((out / "ame_config.yaml").read_text())
    assert run["order"] == [2, 0, 1] and run["resolved"]["order"] == [[2, 0, 1]]
    assert "--order 2,0,1" in ModelCard.load(out / "README.md").text
    assert main(["merge", "--config", str(out / "ame_config.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert weights_sha256(tmp_path / "again") == weights_sha256(out)
    rev = merge(llamas, tmp_path / "rev", order="reverse", progress=False)
    given = merge(llamas, tmp_path / "given", progress=False)
    assert rev.order == [[2, 1, 0]] and weights_sha256(rev.path) != weights_sha256(given.path)
    capsys.readouterr()
    assert main(["merge", *map(str, llamas), "--out", str(tmp_path / "bad"), "--order", "0,1"]) == 2
    assert "not a permutation of the 3 ingredient indices" in capsys.readouterr().err


STEP_SCRIPT = r"""
import inspect, json, sys
import torch
from torch.optim import Optimizer
from ame_hf.optimizers import OPTIMIZERS, new_optimizer, optimizer_class, take_step

def run(name, kwargs, stepper, build):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(257, generator=g)
    opt = build(optimizer_class(name), [w], lr=0.05, **kwargs)
    for t in range(4):
        w.grad = w - torch.randn(257, generator=g)
        opt.param_groups[0]["lr"] = 0.05 / (t + 1)
        stepper(opt)
    return w.detach().clone()

cases = [(n, {}) for n in sorted(OPTIMIZERS)] + [(n, {"fused": True}) for n in ("adam", "adamw", "sgd", "adagrad")]
cases += [("sgd", {"momentum": 0.9, "nesterov": True}), ("adam", {"amsgrad": True, "weight_decay": 0.1})]
mine = [run(n, kw, take_step, new_optimizer) for n, kw in cases]
print(json.dumps({"dynamo_after_take_step": "torch._dynamo" in sys.modules,
                  "mark_left": hasattr(inspect.unwrap(Optimizer.add_param_group), "__dynamo_disable")}))
theirs = [run(n, kw, lambda o: o.step(), lambda c, p, **k: c(p, **k)) for n, kw in cases]
print(json.dumps({"dynamo_after_step": "torch._dynamo" in sys.modules,
                  "equal": [bool(torch.equal(a, b)) for a, b in zip(mine, theirs)],
                  "cases": [f"{n} {kw}" for n, kw in cases]}))
"""


def test_take_step_is_optimizer_step_bit_for_bit_without_importing_dynamo():
    # torch.optim imports torch._dynamo (~2 s) on an optimizer's first add_param_group and on every step();
    # take_step/new_optimizer skip only that, so every optimizer's result must be bit-identical to step().
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.splitlines()[-2:])
    assert first == {"dynamo_after_take_step": False, "mark_left": False}
    assert second["dynamo_after_step"] is True  # the reference really took torch's own path
    assert all(second["equal"]), [c for c, ok in zip(second["cases"], second["equal"]) if not ok]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_merge_does_not_import_torch_dynamo(finetunes, tmp_path, optimizer):
    import subprocess
    import sys

    code = ("import sys; from ame_hf.cli import main; rc = main(sys.argv[1:]); "
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "merge", *map(str, finetunes), "--out", str(tmp_path / "out"),
                           "--optimizer", optimizer, "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["no", "dynamo"]
