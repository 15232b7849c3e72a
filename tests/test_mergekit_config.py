"""mergekit configs in (ame_hf/mergekit_config.py): the same YAML file through mergekit 0.1.5 itself (in a virtual
env of its own, built once under a cache folder by benchmarks/run.py's setup_mergekit, about a minute) and
through `ame-hf merge --config`: the same weights within 1e-6 for the deterministic methods; for DARE (another
random mask) the same drop rate and the same L1 norm of the merged task vectors. Unsupported methods: one line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from factories import cli_error_line, load_state, make_finetunes, run_cli, save_base
from test_benchmarks import _bench_run

CACHE = Path(os.environ.get("AME_HF_TEST_CACHE", Path.home() / ".cache" / "ame-hf-tests"))


@pytest.fixture(scope="module")
def mergekit_yaml():
    run = _bench_run()
    exe, note = run.setup_mergekit(CACHE, run.MERGEKIT_SPEC)
    assert exe is not None, note  # CI builds it (about a minute): never skipped
    return exe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    return save_base(root / "base"), make_finetunes(root, n=3, scale=0.05)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Two fine-tunes with 4096-token embeddings (2 x 65536 entries): drop rates measured to about 0.0015."""
    root = tmp_path_factory.mktemp("wide")
    return save_base(root / "base", vocab_size=4096), make_finetunes(root, n=2, scale=0.05, vocab_size=4096)


def both(mergekit_yaml, capsys, tmp_path, config):
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run([str(mergekit_yaml), str(path), str(tmp_path / "mk"), "--no-copy-tokenizer", "--quiet"],
                   check=True, capture_output=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    code, _, err = run_cli(capsys, "merge", "--config", str(path), "--out", str(tmp_path / "ame"))
    assert code == 0, err
    mk, ame = load_state(tmp_path / "mk"), load_state(tmp_path / "ame")
    assert sorted(mk) == sorted(ame)
    return mk, ame


def max_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("method,params,shared", [
    ("linear", [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], {}),
    ("task_arithmetic", [{"weight": 1.0}, {"weight": 0.5}, {"weight": -0.3}], {"lambda": 0.8}),
    ("ties", [{"weight": 0.6, "density": 0.5}, {"weight": 0.3, "density": 0.7}, {"weight": 0.4, "density": 0.3}], {}),
    ("ties", [{"weight": 1.0, "density": 0.4}] * 3, {"normalize": False, "int8_mask": True, "lambda": 0.5}),
    ("breadcrumbs", [{"weight": 1.0, "density": 0.8, "gamma": 0.05}] * 3, {}),
    ("breadcrumbs_ties", [{"weight": 0.5, "density": 0.6}, {"weight": 1.0, "density": 0.6},
                          {"weight": 0.7, "density": 0.6}], {"normalize": True}),
])
def test_deterministic_methods_give_mergekits_weights(mergekit_yaml, models, capsys, tmp_path, method, params, shared):
    base, paths = models
    config = {"merge_method": method, "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(p), "parameters": q} for p, q in zip(paths, params)]}
    if shared:
        config["parameters"] = shared
    if method == "linear":
        del config["base_model"]
    mk, ame = both(mergekit_yaml, capsys, tmp_path, config)
    assert max_diff(mk, ame) <= 1e-6
    mean = {k: sum(load_state(p)[k].double() for p in paths) / 3 for k in mk}
    assert max_diff(mk, mean) > 1e-3  # not the plain soup: the test can tell methods apart
    recorded = yaml.safe_load((tmp_path / "ame" / "ame_config.yaml").read_text())
    text = yaml.safe_dump(recorded)
    assert "sgd" in text and ("harmonic" in text if method == "linear" else "constant" in text)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_has_mergekits_drop_rate_and_expectation(mergekit_yaml, wide, capsys, tmp_path, method):
    base, paths = wide
    config = {"merge_method": method, "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.3}} for p in paths]}
    mk, ame = both(mergekit_yaml, capsys, tmp_path, config)
    b = load_state(base)
    big = [k for k in b if b[k].numel() >= 65536]
    assert len(big) == 2
    count = sum(b[k].numel() for k in big)
    dropped = {name: sum(int((s[k] == b[k]).sum()) for k in big) / count for name, s in (("mk", mk), ("ame", ame))}
    # an entry stays at the base where both task vectors are dropped (or, with ties, where the kept ones disagree)
    assert abs(dropped["mk"] - dropped["ame"]) < 0.01, dropped  # about 5 standard deviations
    if method == "dare_linear":
        assert abs(dropped["ame"] - 0.7 ** 2) < 0.01, dropped
    l1 = {name: sum(float((s[k].double() - b[k].double()).abs().sum()) for k in big) for name, s in
          (("mk", mk), ("ame", ame))}
    assert abs(l1["mk"] / l1["ame"] - 1) < 0.03, l1
    assert max_diff(mk, ame) > 1e-3  # another mask: said in README


@pytest.mark.parametrize("method,closest", [("slerp", "--weights"), ("model_stock", "--pivot"),
                                            ("della", "dare_ties"), ("passthrough", "does not stack")])
def test_other_methods_are_refused_naming_the_closest_command(models, capsys, tmp_path, method, closest):
    base, paths = models
    path = tmp_path / "mk.yml"
    path.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(base),
                                    "models": [{"model": str(p)} for p in paths]}))
    cli_error_line(capsys, "merge", "--config", str(path), "--out", str(tmp_path / "out"),
                   needles=(method, closest))
    path.write_text(yaml.safe_dump({"base_model": str(base), "gate_mode": "hidden", "experts": []}))
    cli_error_line(capsys, "merge", "--config", str(path), "--out", str(tmp_path / "out"), needles=("mixture",))
    assert not (tmp_path / "out").exists()


def test_the_translation_is_the_ame_form():
    from ame_hf.mergekit_config import translate

    refs, values, summary = translate({"merge_method": "dare_ties", "base_model": "org/base",
                                       "models": [{"model": "org/a", "parameters": {"weight": 2, "density": 0.5}},
                                                  {"model": "org/b", "parameters": {"weight": 1, "density": 0.4}},
                                                  {"model": "org/base"}],
                                       "tokenizer_source": "base", "dtype": "bfloat16"})
    assert refs == ["org/a", "org/b"] and "dare_ties" in summary
    assert values == {"dtype": "bfloat16", "tokenizer_source": "org/base", "optimizer": "sgd", "lr": 3.0,
                      "schedule": "constant", "batch_size": 2, "epochs": 1, "pivot": "org/base", "weights": [2.0, 1.0],
                      "transform": "dare_ties", "density": [0.5, 0.4], "rescale": "l1", "disjoint_sum": True}


def test_flags_change_the_ame_form_of_a_mergekit_config(models, capsys, tmp_path):
    base, paths = models
    path = tmp_path / "ties.yml"
    path.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in paths]}))
    code, _, err = run_cli(capsys, "merge", "--config", str(path), "--out", str(tmp_path / "adam"), "--optimizer",
                           "adam", "--lr", "0.01", "--epochs", "2")
    assert code == 0, err
    recorded = yaml.safe_load((tmp_path / "adam" / "ame_config.yaml").read_text())
    assert (recorded["optimizer"], recorded["lr"], recorded["epochs"], recorded["transform"]) == ("adam", 0.01, 2, "ties")
