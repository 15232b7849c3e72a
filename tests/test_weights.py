"""Ingredient weights (ame_hf/weights.py): the weighted soup is the weighted mean, equal weights are no weights
(the same bytes), and every optimizer takes the weights by the documented rule, checked against a whole-model
torch.optim reference that implements the rule on its own."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from ame_hf import AmeConfig, merge
from ame_hf.engine import ingredient_order
from ame_hf.errors import InvalidConfigError
from ame_hf.optimizers import optimizer_class
from factories import load_state, make_finetunes, run_cli

WEIGHTS = [0.5, 0.3, 0.2, 1.0]


def floats(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


def max_abs_diff(a, b):
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def weighted_mean(states, weights):
    total = sum(weights)
    return {k: sum(w * s[k].double() for s, w in zip(states, weights)) / total for k in floats(states[0])}


def reference(states, config, weights):
    """The rule, whole-model: one torch.optim over all tensors; weights scaled to mean 1; the target of a batch is
    its weighted mean; lr * batch weight / batch size (constant) or / weight seen this epoch (harmonic)."""
    cfg = config.resolved()
    n = len(states)
    rel = [w * n / sum(weights) for w in weights]
    names = sorted(floats(states[0]))
    mean = weighted_mean(states, weights)
    start = {k: (mean[k] if cfg.pivot == "mean" else states[cfg.pivot][k].double()).float() for k in names}
    params = [start[k].clone() for k in names]
    if cfg.relative_lr is not None:  # the spread is unweighted, to the pivot (to the plain mean for a mean pivot)
        centre = {k: sum(s[k].double() for s in states) / n if cfg.pivot == "mean" else start[k].double() for k in names}
        lrs = [cfg.relative_lr * math.sqrt(sum(float(((s[k].double() - centre[k]) ** 2).sum()) for s in states)
                                           / (n * states[0][k].numel())) for k in names]
    else:
        lrs = [cfg.lr] * len(names)
    opt = optimizer_class(cfg.optimizer)([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)],
                                         **dict(cfg.optimizer_args))
    for epoch in ingredient_order(n, cfg.epochs, shuffle=cfg.shuffle, seed=cfg.seed, order=cfg.order):
        seen = 0.0
        for b in range(0, n, cfg.batch_size):
            batch = epoch[b:b + cfg.batch_size]
            weight = sum(rel[i] for i in batch)
            seen += weight
            factor = weight / len(batch) if cfg.schedule == "constant" else weight / seen
            for p, k in zip(params, names):
                target = sum(rel[i] * states[i][k].double() for i in batch) / weight
                p.grad = p - target.float()
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * factor
            opt.step()
    return dict(zip(names, params))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_weighted_soup_is_the_weighted_mean(finetunes, tmp_path, batch_size):
    result = merge(finetunes, tmp_path / "out", AmeConfig.soup(weights=WEIGHTS, batch_size=batch_size), progress=False)
    states = [load_state(p) for p in finetunes]
    assert max_abs_diff(floats(load_state(result.path)), weighted_mean(states, WEIGHTS)) <= 1e-6
    # ... and not the plain mean
    assert max_abs_diff(floats(load_state(result.path)), weighted_mean(states, [1, 1, 1, 1])) > 1e-3
    recorded = yaml.safe_load((result.path / "ame_config.yaml").read_text())
    assert recorded["config"]["weights"] == WEIGHTS if "config" in recorded else recorded["weights"] == WEIGHTS
    assert "--weights 0.5,0.3,0.2,1.0" in (result.path / "README.md").read_text()  # the reproduce command


@pytest.mark.parametrize("options", [dict(), dict(optimizer="sgd"), dict(optimizer="adam", lr=0.02, batch_size=2)])
def test_equal_weights_give_the_unweighted_bytes(finetunes, tmp_path, options):
    plain = merge(finetunes, tmp_path / "plain", AmeConfig(**options), progress=False)
    equal = merge(finetunes, tmp_path / "equal", AmeConfig(weights=[0.3] * 4, **options), progress=False)
    a, b = load_state(plain.path), load_state(equal.path)
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)


@pytest.mark.parametrize("options", [
    dict(optimizer="adam", lr=0.02, epochs=2),
    dict(optimizer="adam", relative_lr=0.1, pivot=1, batch_size=2),
    dict(optimizer="sgd", lr=0.7, schedule="constant", batch_size=3, optimizer_args={"momentum": 0.9}),
    dict(optimizer="rmsprop", lr=0.01, order="reverse"),
    dict(optimizer="sgd", lr=1.0, epochs=2, shuffle=True, seed=4),
])
def test_every_optimizer_takes_the_weights_by_the_rule(finetunes, tmp_path, options):
    cfg = AmeConfig(weights=WEIGHTS, **options)
    result = merge(finetunes, tmp_path / "out", cfg, progress=False)
    states = [load_state(p) for p in finetunes]
    out = floats(load_state(result.path))
    assert max_abs_diff(out, reference(states, cfg, WEIGHTS)) <= 1e-6
    unweighted = merge(finetunes, tmp_path / "plain", AmeConfig(**options), progress=False)
    assert max_abs_diff(out, floats(load_state(unweighted.path))) > 1e-5  # the weights changed something


def test_where_ingredients_agree_the_weighted_output_is_that_value(tmp_path):
    paths = make_finetunes(tmp_path / "ft", n=3, scale=0.05)
    from safetensors.torch import load_file, save_file
    first = load_file(paths[0] / "model.safetensors")
    for p in paths[1:]:  # every ingredient shares the first's norm weights exactly
        state = load_file(p / "model.safetensors")
        state.update({k: v for k, v in first.items() if "norm" in k})
        save_file(state, p / "model.safetensors", metadata={"format": "pt"})
    for cfg in (AmeConfig.soup(weights=[0.7, 0.2, 0.1]), AmeConfig(weights=[3, 1, 2]),
                AmeConfig(optimizer="adam", lr=0.1, weights=[3, 1, 2], batch_size=2, epochs=2)):
        out = load_state(merge(paths, tmp_path / "out", cfg, progress=False, overwrite=True).path)
        for k in (k for k in first if "norm" in k):
            assert torch.equal(out[k], first[k]), (cfg, k)


def test_weights_on_the_command_line_and_bad_weights(finetunes, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "merge", *map(str, finetunes), "--out", str(tmp_path / "cli"), "--optimizer", "sgd",
                         "--weights", "0.5,0.3,0.2,1")
    assert code == 0
    states = [load_state(p) for p in finetunes]
    assert max_abs_diff(floats(load_state(tmp_path / "cli")), weighted_mean(states, WEIGHTS)) <= 1e-6
    with pytest.raises(InvalidConfigError, match="3 weights for 4 ingredients"):
        merge(finetunes, tmp_path / "x", weights=[1, 2, 3], progress=False)
    with pytest.raises(InvalidConfigError, match="harmonic"):
        merge(finetunes, tmp_path / "x", optimizer="sgd", weights=[1, -1, 1, 1], progress=False)
    with pytest.raises(InvalidConfigError, match="not a finite number"):
        AmeConfig(weights="1,x")
    assert not (tmp_path / "x").exists()


def test_weight_in_the_yaml_ingredients(finetunes, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"optimizer": "sgd", "ingredients": [
        {"model": str(p), "weight": w} for p, w in zip(finetunes, WEIGHTS)]}))
    code, _, err = run_cli(capsys, "merge", "--config", str(recipe), "--out", str(tmp_path / "out"))
    assert code == 0, err
    states = [load_state(p) for p in finetunes]
    assert max_abs_diff(floats(load_state(tmp_path / "out")), weighted_mean(states, WEIGHTS)) <= 1e-6
    again = yaml.safe_load((tmp_path / "out" / "ame_config.yaml").read_text())
    assert again["weights"] == WEIGHTS


def test_weighted_soup_of_differing_vocabularies_goes_by_token(tmp_path):
    """Token rows matched by token (_token_rows.merge_token_rows): a shared token's row is the weighted mean, a token
    only one ingredient has keeps that ingredient's row."""
    from transformers import AddedToken

    from factories import build_base, tiny_tokenizer

    folders = []
    for i, added in enumerate([[], ["<extra>"]]):
        tok = tiny_tokenizer()
        tok.add_tokens([AddedToken(t) for t in added])
        build_base("llama", seed=i, vocab_size=len(tok)).save_pretrained(tmp_path / f"ft{i}")
        tok.save_pretrained(tmp_path / f"ft{i}")
        folders.append(tmp_path / f"ft{i}")
    out = load_state(merge(folders, tmp_path / "out", AmeConfig.soup(weights=[3, 1]), progress=False).path)
    a, b = load_state(folders[0]), load_state(folders[1])
    key = "model.embed_tokens.weight"
    shared = a[key].shape[0]
    assert out[key].shape[0] == shared + 1
    want = (3 * a[key].double() + b[key][:shared].double()) / 4
    assert float((out[key][:shared].double() - want).abs().max()) <= 1e-6
    assert torch.equal(out[key][shared], b[key][shared])
    assert float((out["model.norm.weight"].double() - (3 * a["model.norm.weight"].double()
                                                        + b["model.norm.weight"].double()) / 4).abs().max()) <= 1e-6
