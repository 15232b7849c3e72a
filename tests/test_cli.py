"""The `ame-hf merge/check/push` command line (ame_hf/cli.py) on local directories: outputs, config round trip,
formats (sharded, .bin, integer buffers), one-line errors, and a Hub token that never leaks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ame_hf.cli import build_parser, main
from factories import assert_one_error_line, load_state, make_finetunes, run_cli, weights_sha256
from hub_server import HubServer


def test_merge_output_loads_with_from_pretrained(llamas, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, _, _ = run_cli(capsys, "merge", *llamas, "--out", out, "--optimizer", "adamw", "--lr", "1e-3", "--quiet")
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    state = load_state(out)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert {"config.json", "generation_config.json", "ame_config.yaml", "README.md", "model.safetensors"} <= {
        p.name for p in out.iterdir()}
    with safe_open(out / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["ame_optimizer"] == "adamw" and meta["ame_ingredients"] == "3" and meta["format"] == "pt"
    assert not list(tmp_path.glob(".ame-tmp-*")), "staging directory left behind"


def test_config_round_trip_gives_identical_bytes(llamas, tmp_path, capsys):
    first = tmp_path / "first"
    code, _, _ = run_cli(capsys, "merge", *llamas, "--out", first, "--optimizer", "rmsprop", "--relative-lr", "0.1",
                     "--shuffle", "--seed", "5", "--epochs", "2", "--optimizer-args", '{"alpha": 0.9}', "--quiet")
    assert code == 0
    again = tmp_path / "again"
    code, _, _ = run_cli(capsys, "merge", "--config", first / "ame_config.yaml", "--out", again, "--quiet")
    assert code == 0
    assert weights_sha256(first) == weights_sha256(again)
    assert (first / "ame_config.yaml").read_text() == (again / "ame_config.yaml").read_text()
    # A different seed really changes the bytes (the round trip is not vacuous).
    other = tmp_path / "other"
    assert run_cli(capsys, "merge", "--config", first / "ame_config.yaml", "--seed", "6", "--out", other, "--quiet")[0] == 0
    assert weights_sha256(first) != weights_sha256(other)


def test_sharded_inputs_and_outputs(tmp_path, capsys):
    paths = make_finetunes(tmp_path / "ft", n=2, max_shard_size="10KB")
    assert (paths[0] / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    code, _, _ = run_cli(capsys, "merge", *paths, "--out", out, "--max-shard-size", "12KB", "--optimizer", "sgd", "--quiet")
    assert code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    mean = {k: (load_state(paths[0])[k] + load_state(paths[1])[k]) / 2 for k in load_state(paths[0])}
    merged = load_state(out)
    assert max(float((merged[k] - mean[k]).abs().max()) for k in mean) <= 1e-6
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_bin_ingredients_are_read_with_weights_only(tmp_path, capsys):
    paths = make_finetunes(tmp_path / "ft", n=2)
    for p in paths:  # convert to the legacy format
        torch.save(load_file(p / "model.safetensors"), p / "pytorch_model.bin")
        (p / "model.safetensors").unlink()
    out = tmp_path / "out"
    assert run_cli(capsys, "merge", *paths, "--out", out, "--optimizer", "sgd", "--quiet")[0] == 0
    assert (out / "model.safetensors").is_file()


def _add_int_buffer(path, value):
    state = load_file(path / "model.safetensors")
    state["step_counter"] = torch.tensor([value, 7], dtype=torch.int64)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_integer_tensors_are_copied_when_equal_and_refused_when_different(tmp_path, capsys):
    paths = make_finetunes(tmp_path / "ft", n=2)
    for p in paths:
        _add_int_buffer(p, 3)
    out = tmp_path / "out"
    assert run_cli(capsys, "merge", *paths, "--out", out, "--quiet")[0] == 0
    assert torch.equal(load_state(out)["step_counter"], torch.tensor([3, 7]))
    _add_int_buffer(paths[1], 4)
    code, _, err = run_cli(capsys, "merge", *paths, "--out", tmp_path / "bad", "--quiet")
    assert_one_error_line(code, err, "step_counter", "differs")
    assert not (tmp_path / "bad").exists()


def test_mixed_dtypes_refused_under_auto_and_merged_with_explicit_dtype(tmp_path, capsys):
    a = make_finetunes(tmp_path / "a", n=1)[0]
    b = make_finetunes(tmp_path / "b", n=1, dtype=torch.bfloat16, names=["bf"])[0]
    code, _, err = run_cli(capsys, "merge", a, b, "--out", tmp_path / "o1", "--quiet")
    assert_one_error_line(code, err, "dtype", "--dtype")
    assert run_cli(capsys, "merge", a, b, "--out", tmp_path / "o2", "--dtype", "bfloat16", "--quiet")[0] == 0
    assert all(v.dtype == torch.bfloat16 for v in load_state(tmp_path / "o2").values())


def test_unknown_optimizer_lists_valid_names(llamas, tmp_path, capsys):
    code, _, err = run_cli(capsys, "merge", *llamas, "--out", tmp_path / "o", "--optimizer", "adamz")
    assert_one_error_line(code, err, "adamz", "adamw", "sgd")
    code, _, err = run_cli(capsys, "merge", *llamas, "--out", tmp_path / "o", "--optimizer", "LBFGS")
    assert_one_error_line(code, err, "LBFGS", "closure")


def test_bad_optimizer_argument(llamas, tmp_path, capsys):
    code, _, err = run_cli(capsys, "merge", *llamas, "--out", tmp_path / "o", "--optimizer-args", '{"betaz": 1}')
    assert_one_error_line(code, err, "betaz", "betas")


def test_missing_directory(llamas, tmp_path, capsys):
    code, _, err = run_cli(capsys, "merge", llamas[0], "./no/such/dir", "--out", tmp_path / "o")
    assert_one_error_line(code, err, "./no/such/dir")
    assert not (tmp_path / "o").exists()


def test_different_tensor_names_and_shapes_are_reported(tmp_path, capsys):
    a = make_finetunes(tmp_path / "a", n=1)[0]
    wide = make_finetunes(tmp_path / "w", n=1, intermediate_size=48)[0]
    code, _, err = run_cli(capsys, "merge", a, wide, "--out", tmp_path / "o")
    assert_one_error_line(code, err, "intermediate_size")
    code, out, _ = run_cli(capsys, "check", a, wide)
    assert code == 1 and "mlp.up_proj.weight" in out and "[32, 16]" in out and "[48, 16]" in out
    renamed = tmp_path / "renamed"
    shutil.copytree(a, renamed)
    state = load_file(renamed / "model.safetensors")
    state["lm_head.extra"] = state.pop("lm_head.weight")
    save_file(state, renamed / "model.safetensors", metadata={"format": "pt"})
    code, out, _ = run_cli(capsys, "check", a, renamed)
    assert code == 1 and "missing tensor(s) 'lm_head.weight'" in out and "extra tensor(s) 'lm_head.extra'" in out
    code, out, _ = run_cli(capsys, "check", a, make_finetunes(tmp_path / "c", n=1, seed=3)[0])
    assert code == 0 and out.startswith("OK")


def test_non_empty_out_needs_overwrite(llamas, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(capsys, "merge", *llamas, "--out", out, "--quiet")[0] == 0
    before = (out / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "merge", *llamas, "--out", out, "--quiet", "--optimizer", "sgd")
    assert_one_error_line(code, err, "previous ame-hf output", "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before
    assert run_cli(capsys, "merge", *llamas, "--out", out, "--overwrite", "--quiet", "--optimizer", "sgd")[0] == 0
    assert (out / "model.safetensors").read_bytes() != before


def test_debug_shows_traceback(llamas, tmp_path):
    from ame_hf.errors import UnknownOptimizerError

    with pytest.raises(UnknownOptimizerError):
        main(["merge", *map(str, llamas), "--out", str(tmp_path / "o"), "--optimizer", "nope", "--debug"])


CANARY = "hf_canary_5a7c0ffee0123456789"


def test_token_never_leaks(tmp_path):
    server = HubServer(tmp_path / "hub", tokens={CANARY: {"user"}}).start()
    try:
        paths = make_finetunes(tmp_path / "ft", n=2)
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "home")}
        outputs = []
        for i, (token_args, extra_env) in enumerate([(["--token", CANARY], {}), ([], {"HF_TOKEN": CANARY})]):
            out = tmp_path / f"out{i}"
            proc = subprocess.run([sys.executable, "-m", "ame_hf", "merge", *map(str, paths), "--out", str(out),
                                   "--push", "--repo-id", f"user/secret{i}", "--debug", *token_args],
                                  capture_output=True, text=True, env={**env, **extra_env})
            assert proc.returncode == 0, proc.stderr
            outputs += [proc.stdout, proc.stderr]
            outputs += [f.read_bytes().decode("latin-1") for f in out.rglob("*") if f.is_file()]
            # A failing push with --debug shows a traceback: it must not carry the token either.
            fail = subprocess.run([sys.executable, "-m", "ame_hf", "push", str(out), "--repo-id", "other/x",
                                   "--debug", *token_args], capture_output=True, text=True, env={**env, **extra_env})
            assert fail.returncode != 0 and "Traceback" in fail.stderr
            outputs += [fail.stdout, fail.stderr]
        outputs += [f.read_bytes().decode("latin-1") for f in (tmp_path / "home").rglob("*") if f.is_file()]
        assert all(CANARY not in text for text in outputs)
    finally:
        server.stop()


def test_keep_freed_memory_takes_effect_on_glibc_and_merges_the_same_bytes(finetunes, tmp_path):
    # The CLI tunes glibc's malloc (ame_hf.devices.keep_freed_memory); that must not change one output byte.
    from ame_hf import AmeConfig, merge
    from factories import weights_sha256

    code = "from ame_hf.devices import keep_freed_memory; print(keep_freed_memory())"
    took = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):
        assert took == "True"
    cli = subprocess.run([sys.executable, "-m", "ame_hf", "merge", *map(str, finetunes), "--out", str(tmp_path / "cli"),
                          "--quiet"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    api = merge(finetunes, tmp_path / "api", AmeConfig(), progress=False)
    assert weights_sha256(tmp_path / "cli") == weights_sha256(api.path)


def test_a_cli_merge_imports_with_the_collector_paused_and_leaves_it_running(finetunes, tmp_path):
    """`imports_without_gc`: the check stage's imports (torch among them) are frozen, the collector runs again for
    the merge and after it, and a collector the caller had turned off stays off."""
    code = f"""
import gc, json, sys
from ame_hf.cli import imports_without_gc, main
rc = main(["merge", *{[str(p) for p in finetunes]!r}, "--out", {str(tmp_path / "out")!r}, "--quiet"])
frozen, on = gc.get_freeze_count(), gc.isenabled()
torch_loaded = "torch" in sys.modules
gc.disable()
with imports_without_gc():
    pass
print(json.dumps([rc, frozen, on, torch_loaded, gc.isenabled()]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rc, frozen, on, torch_loaded, after_off = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rc == 0 and torch_loaded
    assert frozen > 50_000  # torch's objects, not only ame-hf's
    assert on and not after_off


def test_under_torchrun_only_the_main_process_prints_the_result(tmp_path):
    """Issue 23 item 2: two processes, one 'merged ...' line (every rank printed it)."""
    import os
    import subprocess
    import sys

    from factories import make_finetunes

    paths = make_finetunes(tmp_path / "ft", n=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ame_hf",
           "merge", *map(str, paths), "--out", str(tmp_path / "out"), "--device", "cpu", "--optimizer", "sgd"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("merged 2 checkpoints")]
    assert len(said) == 1, proc.stderr[-3000:]


def test_check_leads_with_what_decides_and_one_checkpoint_is_not_mergeable(llamas, tmp_path, capsys):
    """Issue 23 item 5: `check` of one checkpoint is no 'OK ... 1 checkpoints can be merged' (exit 0) while merge
    refuses it; an incompatible pair prints what decides (no notes on how a merge would go, no 'run ame-hf check'
    inside check), and --verbose everything."""
    from factories import make_finetunes

    assert main(["check", str(llamas[0])]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL a merge needs at least 2 ingredients"), out
    wide = make_finetunes(tmp_path / "wide", n=1, intermediate_size=48, vocab_size=77)[0]
    assert main(["check", str(llamas[0]), str(wide)]) == 1
    short = capsys.readouterr().out
    assert "run `ame-hf check`" not in short and "note:" not in short and "more (--verbose shows all)" in short, short
    assert len(short.splitlines()) <= 12, short
    assert main(["check", str(llamas[0]), str(wide), "--verbose"]) == 1
    full = capsys.readouterr().out
    assert len(full.splitlines()) > len(short.splitlines()) and "more (--verbose" not in full


def test_help_guides_and_version_names_the_stack(capsys):
    """Issue 23 item 4: merge's options in groups with metavars and examples, -o/-q, REF explained in every
    command, merge's push branch unambiguous (--revision kept, deprecated), and --version with the stack."""
    import pytest

    for command in ("merge", "check", "evaluate", "tune", "push"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "examples:\n  ame-hf " + command in text, command
        assert command == "push" or "org/name[@revision]" in text, command
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    for group in ("ingredients and AME:", "output:", "Hub and push:", "devices:", "evaluation (validation data):",
                  "logging:"):
        assert "\n" + group in text, group
    assert "-o DIR, --out DIR" in text and "-q, --quiet" in text and "--push-branch BRANCH" in text
    assert "--revision" not in text  # the deprecated spelling works but is not offered
    parsed = build_parser().parse_args(["merge", "a", "b", "-o", "x", "-q", "--revision", "dev"])
    assert parsed.out == "x" and parsed.quiet and parsed.revision == "dev"
    assert "--revision is deprecated here, use --push-branch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--version"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ame-hf ") and [line.split()[0] for line in lines[1:4]] == [
        "torch", "transformers", "huggingface_hub"]


def test_main_gives_the_callers_logging_back(llamas, tmp_path, capsys, caplog):
    # main() from a script (or an earlier test) once left the package logger unpropagated with a
    # handler on a stream that may be closed by now, so the caller's own logging never saw a warning.
    import logging

    from huggingface_hub.utils import are_progress_bars_disabled

    logger = logging.getLogger("ame_hf")
    before = (logger.propagate, logger.level, list(logger.handlers), are_progress_bars_disabled())
    assert main(["check", str(llamas[0]), "--quiet"]) == 1
    assert (logger.propagate, logger.level, list(logger.handlers), are_progress_bars_disabled()) == before
    with caplog.at_level("WARNING", logger="ame_hf"):
        logger.warning("still heard")
    assert "still heard" in caplog.text
