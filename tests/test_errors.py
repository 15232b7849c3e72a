"""Errors end to end (ame_hf/errors.py and how the CLI reports them): the exception tree, and the catalogue
of bad inputs (DESIGN §6), where every case exits non-zero with one clear line naming the culprit, no
traceback, and nothing at --out."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

import ame_hf.errors as errors
from ame_hf.cli import main
from factories import assert_one_error_line, cli_error_line, make_finetunes


# The tree drawn in errors.py's docstring: each class, its ame-hf parent and the built-in it also is.
TREE = {
    "InvalidConfigError": ("AmeError", ValueError),
    "UnknownOptimizerError": ("InvalidConfigError", ValueError),
    "UnsupportedOptimizerError": ("InvalidConfigError", ValueError),
    "IngredientNotFoundError": ("AmeError", FileNotFoundError),
    "CheckpointError": ("AmeError", ValueError),
    "IncompatibleCheckpointsError": ("AmeError", ValueError),
    "OutputError": ("AmeError", OSError),
    "InsufficientSpaceError": ("OutputError", OSError),
    "HubError": ("AmeError", OSError),
    "PushError": ("HubError", OSError),
}


def test_every_error_is_also_the_builtin_it_resembles():
    """So callers may catch either: an unreachable Hub (HubError) is caught by `except OSError`, too."""
    assert sorted(errors.__all__) == sorted(["AmeError", *TREE])
    for name, (parent, builtin) in TREE.items():
        cls = getattr(errors, name)
        assert cls.__bases__[0] is getattr(errors, parent) and issubclass(cls, builtin), name
        assert name in errors.__doc__, f"{name} is missing from the tree in errors.py's docstring"


@pytest.fixture(scope="module")
def world(hub, hub_token, tmp_path_factory):
    """Local ingredients and their broken variants, plus Hub repos."""
    root = tmp_path_factory.mktemp("bad")
    a, b = make_finetunes(root / "ok", n=2)
    api = HfApi(token=hub_token)
    for name, path in (("org/fail-a", a), ("org/fail-b", b)):
        api.create_repo(name, exist_ok=True)
        api.upload_folder(repo_id=name, folder_path=path)
    api.create_repo("org/fail-noweights", exist_ok=True)
    api.upload_file(repo_id="org/fail-noweights", path_or_fileobj=a / "config.json", path_in_repo="config.json")
    api.create_repo("org/fail-gated", exist_ok=True)
    api.upload_folder(repo_id="org/fail-gated", folder_path=b)
    hub.set_gated("org/fail-gated", True)

    def variant(name, edit):
        path = root / name
        shutil.copytree(b, path)
        edit(path)
        return path

    def corrupt_header(p):
        data = bytearray((p / "model.safetensors").read_bytes())
        data[8:40] = b"{this is not json" + b" " * 15
        (p / "model.safetensors").write_bytes(bytes(data))

    def truncate(p):
        data = (p / "model.safetensors").read_bytes()
        (p / "model.safetensors").write_bytes(data[: len(data) // 2])

    def shard_index(names):
        def edit(p):
            state = load_file(p / "model.safetensors")
            (p / "model.safetensors").unlink()
            keys = sorted(state)
            save_file({k: state[k] for k in keys[:5]}, p / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
            weight_map = {k: "model-00001-of-00002.safetensors" for k in keys[:5]}
            weight_map.update({k: names for k in keys[5:]})
            (p / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return edit

    def retype(p):
        cfg = json.loads((p / "config.json").read_text())
        cfg["model_type"] = "mistral"
        (p / "config.json").write_text(json.dumps(cfg))

    def edit_state(fn):
        def edit(p):
            state = load_file(p / "model.safetensors")
            fn(state)
            save_file(state, p / "model.safetensors", metadata={"format": "pt"})
        return edit

    def nan(state):
        state["model.norm.weight"][3] = float("nan")

    paths = {
        "a": a, "b": b,
        "corrupt": variant("corrupt", corrupt_header),
        "truncated": variant("truncated", truncate),
        "missing_shard": variant("missing_shard", shard_index("model-00002-of-00002.safetensors")),
        "escape": variant("escape", shard_index("../../etc/passwd")),
        "model_type": variant("model_type", retype),
        "shape": variant("shape", edit_state(lambda s: s.update({"lm_head.weight": torch.zeros(65, 16)}))),
        "missing": variant("missing", edit_state(lambda s: s.pop("lm_head.weight"))),
        "extra": variant("extra", edit_state(lambda s: s.update({"extra.bias": torch.zeros(3)}))),
        "bf16": variant("bf16", edit_state(lambda s: s.update({k: v.bfloat16() for k, v in s.items()}))),
        "nan": variant("nan", edit_state(nan)),
        "file": root / "ok" / "ft0" / "config.json",
    }
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("optimizer: [adam\n")
    unknown_yaml = root / "unknown.yaml"
    unknown_yaml.write_text("optimizer: adam\nlearning_rate: 0.1\n")
    paths["bad_yaml"], paths["unknown_yaml"] = bad_yaml, unknown_yaml
    parent_file = root / "a-file"
    parent_file.write_text("x")
    paths["parent_file"] = parent_file
    nonempty = root / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep").write_text("keep")
    paths["nonempty"] = nonempty
    return paths


# (id, argv builder, substrings that the error line must contain)
CASES = [
    ("missing-local-path", lambda w: [w["a"], "./no/such/model"], ["./no/such/model"]),
    ("missing-repo", lambda w: ["org/fail-a", "org/nope-nope"], ["org/nope-nope", "not found"]),
    ("missing-revision", lambda w: ["org/fail-a", "org/fail-b@v9"], ["'v9'", "does not exist"]),
    ("bad-token", lambda w: ["org/fail-a", "org/fail-b", "--token", "hf_bogus"], ["401", "--token"]),
    ("gated-repo", lambda w: ["org/fail-a", "org/fail-gated"], ["org/fail-gated", "gated"]),
    ("repo-without-weights", lambda w: ["org/fail-a", "org/fail-noweights"], ["org/fail-noweights", "no weights"]),
    ("ref-is-a-file", lambda w: [w["a"], w["file"]], ["config.json", "is a file"]),
    ("corrupt-header", lambda w: [w["a"], w["corrupt"]], ["corrupt", "not a valid safetensors"]),
    ("truncated-file", lambda w: [w["a"], w["truncated"]], ["truncated", "not a valid safetensors"]),
    ("index-missing-shard", lambda w: [w["a"], w["missing_shard"]], ["model-00002-of-00002.safetensors", "missing"]),
    ("index-escapes-directory", lambda w: [w["a"], w["escape"]], ["../../etc/passwd", "unsafe"]),
    ("model-type-mismatch", lambda w: [w["a"], w["model_type"]], ["model_type", "mistral"]),
    ("shape-mismatch", lambda w: [w["a"], w["shape"]], ["lm_head.weight", "[65, 16]"]),
    ("missing-tensor", lambda w: [w["a"], w["missing"]], ["missing tensor", "lm_head.weight"]),
    ("extra-tensor", lambda w: [w["a"], w["extra"]], ["extra tensor", "extra.bias"]),
    ("dtype-mismatch", lambda w: [w["a"], w["bf16"]], ["dtype", "BF16", "--dtype"]),
    ("nan-in-ingredient", lambda w: [w["a"], w["nan"]], ["model.norm.weight", "NaN", "--allow-nonfinite"]),
    ("device-not-available", lambda w: [w["a"], w["b"], "--device", "cuda:3"], ["cuda:3", "--device cpu"]),
    ("device-not-a-device", lambda w: [w["a"], w["b"], "--device", "gpu please"], ["gpu please", "cuda"]),
]
# Usage errors: found by the validation step, before torch or the Hub client loads; exit 2, naming the flag.
USAGE_CASES = [
    ("one-ingredient", lambda w: [w["a"]], ["at least 2 ingredients"]),
    ("unknown-optimizer", lambda w: [w["a"], w["b"], "--optimizer", "adamq"], ["--optimizer 'adamq'", "adamw"]),
    ("misspelt-optimizer", lambda w: [w["a"], w["b"], "--optimizer", "adamm"], ["'adamm'", "did you mean adam?"]),
    ("lbfgs", lambda w: [w["a"], w["b"], "--optimizer", "lbfgs"], ["lbfgs", "closure"]),
    ("malformed-optimizer-args", lambda w: [w["a"], w["b"], "--optimizer-args", "{betas: 1"], ["--optimizer-args", "JSON"]),
    ("unknown-optimizer-arg", lambda w: [w["a"], w["b"], "--optimizer", "sgd", "--optimizer-args", '{"momentun": 0.9}'],
     ["--optimizer-args", "momentun", "momentum"]),
    ("lr-in-optimizer-args", lambda w: [w["a"], w["b"], "--optimizer-args", '{"lr": 0.1}'],
     ["--lr", "not inside --optimizer-args"]),
    ("negative-lr", lambda w: [w["a"], w["b"], "--lr", "-1"], ["--lr must be", "-1"]),
    ("zero-epochs", lambda w: [w["a"], w["b"], "--epochs", "0"], ["--epochs must be", "0"]),
    ("pivot-out-of-range", lambda w: [w["a"], w["b"], "--pivot", "5"], ["--pivot index 5", "0..1"]),
    ("tokenizer-source-out-of-range", lambda w: [w["a"], w["b"], "--tokenizer-source", "2"],
     ["--tokenizer-source index 2", "0..1"]),
    ("order-not-a-permutation", lambda w: [w["a"], w["b"], "--order", "0,2"], ["order 0,2", "permutation"]),
    ("batch-larger-than-n", lambda w: [w["a"], w["b"], "--batch-size", "3"], ["--batch-size 3", "(2)"]),
    ("lr-and-relative-lr", lambda w: [w["a"], w["b"], "--lr", "0.1", "--relative-lr", "0.1"],
     ["give either --lr or --relative-lr"]),
    ("invalid-yaml", lambda w: ["--config", w["bad_yaml"]], ["bad.yaml", "YAML"]),
    ("unknown-config-key", lambda w: [w["a"], w["b"], "--config", w["unknown_yaml"]], ["learning_rate", "valid keys"]),
    ("missing-config-file", lambda w: [w["a"], w["b"], "--config", "nope.yaml"], ["nope.yaml", "does not exist"]),
    ("bad-shard-size", lambda w: [w["a"], w["b"], "--max-shard-size", "5 parsecs"], ["--max-shard-size '5 parsecs'", "5GB"]),
    ("shard-size-without-unit", lambda w: [w["a"], w["b"], "--max-shard-size", "5"], ["--max-shard-size '5'", "no unit"]),
    ("max-memory-without-unit", lambda w: [w["a"], w["b"], "--max-memory", "128"], ["--max-memory '128'", "no unit"]),
    ("zero-threads", lambda w: [w["a"], w["b"], "--threads", "0"], ["--threads", ">= 1"]),
    ("push-without-repo-id", lambda w: [w["a"], w["b"], "--push"], ["--repo-id"]),
]


@pytest.mark.parametrize("case_id,argv,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_merge_input(world, tmp_path, capsys, case_id, argv, needles):
    out = tmp_path / "out"
    cli_error_line(capsys, "merge", *argv(world), "--out", out, needles=needles, exit_code=1)
    assert not out.exists()
    assert not list(tmp_path.glob(".ame-tmp-*"))


@pytest.mark.parametrize("case_id,argv,needles", USAGE_CASES, ids=[c[0] for c in USAGE_CASES])
def test_bad_merge_option(world, tmp_path, capsys, case_id, argv, needles):
    out = tmp_path / "out"
    line = cli_error_line(capsys, "merge", *argv(world), "--out", out, needles=needles, exit_code=2)
    if case_id != "unknown-config-key":  # a YAML file's keys are the keywords, and that error lists them
        assert not any(f in line for f in ("relative_lr", "max_shard_size", "optimizer_args", "batch_size")), line
    assert not out.exists()
    assert not list(tmp_path.glob(".ame-tmp-*"))


def test_out_not_empty(world, capsys):
    cli_error_line(capsys, "merge", world["a"], world["b"], "--out", world["nonempty"], needles=("not empty",),
                   exit_code=1)
    assert (world["nonempty"] / "keep").read_text() == "keep"


@pytest.mark.parametrize("target", ["parent_file", "proc"])
def test_out_not_writable(world, capsys, target):
    out = world["parent_file"] / "sub" if target == "parent_file" else Path("/proc/ame-hf-out")
    cli_error_line(capsys, "merge", world["a"], world["b"], "--out", out, needles=(str(out),), exit_code=1)
    assert not out.exists()


def test_disk_full_leaves_nothing(world, tmp_path):
    out = tmp_path / "out"
    limit = 20_000  # bytes: smaller than one output shard

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "ame_hf", "merge", str(world["a"]), str(world["b"]),
                           "--out", str(out), "--quiet"], capture_output=True, text=True, preexec_fn=small_files)
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert_one_error_line(proc.returncode, proc.stderr, "not enough space", exit_code=1)
    assert not out.exists() and not list(tmp_path.glob(".ame-tmp-*"))


def test_same_ingredient_twice_warns_and_merges(world, tmp_path, capsys):
    code = main(["merge", str(world["a"]), str(world["a"]), str(world["b"]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 0 and "given twice" in err


def test_allow_nonfinite_merges_nan(world, tmp_path, capsys):
    assert main(["merge", str(world["a"]), str(world["nan"]), "--out", str(tmp_path / "o"), "--optimizer", "sgd",
                 "--allow-nonfinite", "--quiet"]) == 0
    assert torch.isnan(load_file(tmp_path / "o" / "model.safetensors")["model.norm.weight"][3])


def test_push_failures(world, hub_token, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["merge", str(world["a"]), str(world["b"]), "--out", str(out), "--quiet"]) == 0
    cli_error_line(capsys, "push", out, "--repo-id", "org/fail-push", exit_code=1,
                   needles=("no Hub token", f"ame-hf push {out} --repo-id org/fail-push"))
    line = cli_error_line(capsys, "push", out, "--repo-id", "other/fail-push", "--token", "hf_read_token",
                          needles=("403",), exit_code=1)
    assert "hf_read_token" not in line
    cli_error_line(capsys, "push", world["a"], "--repo-id", "org/fail-push", "--token", hub_token,
                   needles=("not an ame-hf merge output",), exit_code=1)
    assert (out / "model.safetensors").is_file()


def test_check_bad_input_is_one_line(world, capsys):
    cli_error_line(capsys, "check", world["a"], world["corrupt"], needles=("not a valid safetensors",), exit_code=1)


def test_typo_in_a_local_path_is_not_sent_to_the_hub(world, tmp_path, monkeypatch, capsys):
    """`ame-demo/expert-cont` beside an existing `ame-demo/` is a local typo, not a Hub repo ID."""
    demo = tmp_path / "ame-demo"
    demo.mkdir()
    for name in ("expert-count", "expert-skip3"):
        shutil.copytree(world["a"], demo / name)
    monkeypatch.chdir(tmp_path)
    for command in (["merge", "ame-demo/expert-count", "ame-demo/expert-cont", "--out", "m"],
                    ["check", "ame-demo/expert-count", "ame-demo/expert-cont"]):
        cli_error_line(capsys, *command, exit_code=1,
                       needles=("ame-demo/expert-cont: no such local directory (did you mean ame-demo/expert-count?)",))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("option,value,needles", [
    ("--lr", "abc", ["--lr", "'abc'", "a number"]),
    ("--dtype", "fp16", ["--dtype", "'fp16'", "float16", "bfloat16"]),
    ("--epochs", "two", ["--epochs", "'two'", "whole number"]),
])
def test_bad_option_value_is_one_line_with_the_valid_values(world, tmp_path, capsys, option, value, needles):
    line = cli_error_line(capsys, "merge", world["a"], world["b"], "--out", tmp_path / "o", option, value,
                          needles=[*needles, "see `ame-hf merge --help`"], exit_code=2)
    assert line.startswith("ame-hf: error: argument "), line


@pytest.mark.parametrize("argv", [
    ["merge", "./no/such/a", "./no/such/b", "--out", "x"],
    ["merge", "{a}", "{b}", "--out", "{a}"],
    ["check", "{a}", "./no/such/b"],
    ["merge", "{a}", "{b}", "--lr", "abc", "--out", "x"],
])
def test_user_errors_are_found_before_torch_is_imported(world, tmp_path, argv):
    """What makes these errors instant (README "Failure behaviour"; benchmarks/ measures the time)."""
    args = [a.format(a=world["a"], b=world["b"]) for a in argv]
    script = ("import sys; from ame_hf.cli import main; code = main(sys.argv[1:]); "
              "print('torch' in sys.modules, 'huggingface_hub' in sys.modules); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode in (1, 2) and proc.stderr.startswith("ame-hf: error: "), proc.stderr
    assert proc.stdout.split() == ["False", "False"], proc.stdout


# Usage errors of the other commands (and merge's missing --out): exit 2, the flag named.
OTHER_USAGE = [
    (["merge", "{a}", "{b}"], ["no output directory", "--out"]),
    (["tune", "{a}", "{b}", "--data", "val.jsonl"], ["no output directory", "--out"]),
    (["tune", "{a}", "{b}", "--out", "o", "--data", "val.jsonl", "--budget", "-1"], ["--budget must be", "-1"]),
    (["tune", "{a}", "{b}", "--out", "o", "--data", "val.jsonl", "--max-shard-size", "5"], ["--max-shard-size '5'"]),
    (["tune", "{a}", "--out", "o", "--data", "val.jsonl"], ["at least 2 ingredients"]),
    (["check", "{a}", "{b}", "--pivot", "2"], ["--pivot index 2"]),
    (["check", "{a}", "{b}", "--tokenizer-source", "-1"], ["--tokenizer-source index must be >= 0"]),
    (["evaluate", "{a}", "--data", "val.jsonl", "--eval-batch-size", "0"], ["--eval-batch-size must be"]),
    (["evaluate", "{a}", "--data", "val.jsonl", "--max-length", "0"], ["--max-length must be"]),
    (["merge", "{a}", "{b}", "--out", "o", "--greedy-soup", "--eval-data", "val.jsonl", "--relative-lr", "0.1"],
     ["drop --relative-lr"]),
]


@pytest.mark.parametrize("argv,needles", OTHER_USAGE, ids=[" ".join(a[:1] + a[3:]) for a, _ in OTHER_USAGE])
def test_usage_errors_of_every_command_exit_2_naming_the_flag(world, tmp_path, monkeypatch, capsys, argv, needles):
    monkeypatch.chdir(tmp_path)
    cli_error_line(capsys, *[a.format(a=world["a"], b=world["b"]) for a in argv], needles=needles, exit_code=2)
    assert not (tmp_path / "o").exists()


def test_usage_errors_are_found_before_torch_or_the_hub_client_loads(world, tmp_path):
    """The validation step imports neither: checked in a fresh interpreter after each usage error in turn.
    (An unknown *name* inside --optimizer-args is the exception: torch's own signature decides it.)"""
    runs = [[str(a) for a in argv(world)] + ["--out", str(tmp_path / "out")]
            for case_id, argv, _ in USAGE_CASES if case_id != "unknown-optimizer-arg"]
    runs += [[a.format(a=world["a"], b=world["b"]) for a in argv] for argv, _ in OTHER_USAGE]
    script = ("import json, sys; from ame_hf.cli import main\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    code = main(argv)\n"
              "    print(json.dumps([argv, code, 'torch' in sys.modules, 'huggingface_hub' in sys.modules]))\n")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(runs)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(runs) and proc.stderr.count("ame-hf: error: ") == len(runs), proc.stderr
    for argv, code, torch_loaded, hub_loaded in results:
        assert (code, torch_loaded, hub_loaded) == (2, False, False), argv


def test_a_misspelt_optimizer_is_refused_at_once(tmp_path):
    """A whole `ame-hf` process (a bound against importing torch first, not a benchmark)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ame_hf", "merge", "a", "b", "--out", "o", "--optimizer", "adamm"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    elapsed = time.perf_counter() - started
    assert_one_error_line(proc.returncode, proc.stderr, "--optimizer 'adamm'", "did you mean adam?", exit_code=2)
    assert elapsed < 1.5, f"took {elapsed:.2f}s"
