"""`--out` never destroys or alters a user's files (ame_hf/output.py): each refused case leaves every file
byte for byte as it was; staging directories, permissions, the atomic move into place, and merges
interrupted by SIGINT (cleaned up) or SIGKILL (the previous output kept; the next run cleans up)."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ame_hf import merge
from ame_hf.cli import main
from ame_hf.errors import OutputError
from factories import cli_error_line, default_ctrl_c, make_finetunes, start_cli, wait_for


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    """A user's working directory with two fine-tunes and a file of their own; cwd is inside it."""
    work = tmp_path / "work"
    models = make_finetunes(work / "models", n=2)
    (work / "notes.txt").write_text("my notes")
    monkeypatch.chdir(work)
    return work, models


def _refused(capsys, args, *needles):
    return cli_error_line(capsys, "merge", *args, "--quiet", needles=needles, exit_code=1)


@pytest.mark.parametrize("target,needle", [
    (".", "current directory"),
    ("..", "parent of the current directory"),
    ("/", "filesystem root"),
    ("models/ft0", "is the input"),
    ("models", "contains the input"),
    ("models/ft0/sub", "lies inside the input"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_that_would_destroy_user_files_is_refused(workspace, capsys, target, needle, overwrite):
    work, models = workspace
    before = snapshot(work)
    _refused(capsys, [*models, "--out", target, *(["--overwrite"] if overwrite else [])], needle, "--out")
    assert snapshot(work) == before
    assert not list(work.rglob(".ame-tmp-*"))


def test_home_directory_is_refused(workspace, capsys, monkeypatch):
    work, models = workspace
    monkeypatch.setenv("HOME", str(work / "models"))  # a home that holds nothing but models
    before = snapshot(work)
    _refused(capsys, [*models, "--out", work / "models", "--overwrite"], "--out")
    monkeypatch.setenv("HOME", str(work.parent / "home"))
    (work.parent / "home").mkdir()
    (work.parent / "home" / "x").write_text("x")
    _refused(capsys, [*models, "--out", "~", "--overwrite"], "home directory")
    assert snapshot(work) == before and (work.parent / "home" / "x").read_text() == "x"


def test_pivot_checkpoint_is_an_input(workspace, capsys, tmp_path):
    work, models = workspace
    base = make_finetunes(tmp_path / "base", n=1)[0]
    before = snapshot(base)
    _refused(capsys, [*models, "--pivot", base, "--out", base, "--overwrite"], "is the input")
    assert snapshot(base) == before


def test_a_directory_that_is_not_an_ame_output_is_never_replaced(workspace, capsys):
    work, models = workspace
    mine = work / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = snapshot(work)
    _refused(capsys, [*models, "--out", mine, "--overwrite"], "not an ame-hf output", "ame_config.yaml")
    assert snapshot(work) == before


def test_an_empty_directory_and_a_previous_output_may_be_written(workspace, capsys):
    work, models = workspace
    empty = work / "empty"
    empty.mkdir()
    assert main(["merge", *map(str, models), "--out", str(empty), "--quiet"]) == 0
    assert (empty / "ame_config.yaml").is_file()
    first = snapshot(empty)
    _refused(capsys, [*models, "--out", empty, "--optimizer", "sgd"], "previous ame-hf output", "--overwrite")
    assert snapshot(empty) == first
    assert main(["merge", *map(str, models), "--out", str(empty), "--quiet", "--optimizer", "sgd", "--overwrite"]) == 0
    assert snapshot(empty) != first


def test_python_api_applies_the_same_rules(workspace):
    work, models = workspace
    before = snapshot(work)
    for target in (".", models[0], work / "models"):
        with pytest.raises(OutputError) as caught:
            merge(models, target, optimizer="sgd", overwrite=True, progress=False)
        assert "out_dir" in str(caught.value) and "--" not in str(caught.value), str(caught.value)
    assert snapshot(work) == before


def test_a_previous_output_names_the_keyword_in_python_and_the_flag_in_the_cli(workspace, capsys):
    """The same message, written once: `overwrite=True` for a Python caller, `--overwrite` on the command line."""
    work, models = workspace
    merge(models, work / "previous", optimizer="sgd", progress=False)
    with pytest.raises(OutputError) as caught:
        merge(models, work / "previous", optimizer="sgd", progress=False)
    message = str(caught.value)
    assert caught.value.fields == ("out_dir", "overwrite") and "--" not in message, message
    assert message.startswith(f"out_dir {str(work / 'previous')!r} holds a previous") and "pass overwrite=True" in message
    line = _refused(capsys, [*models, "--out", work / "previous"], "previous ame-hf output")
    assert line.endswith(message.replace("out_dir", "--out").replace("overwrite=True", "--overwrite")), line


def test_tune_applies_the_same_rules(workspace, capsys):
    work, models = workspace
    before = snapshot(work)
    data = work / "val.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    for target in (".", str(models[1])):
        cli_error_line(capsys, "tune", *models, "--out", target, "--data", data, "--overwrite", "--quiet",
                       needles=("--out",), exit_code=1)
    assert snapshot(work) == {**before, "val.jsonl": hashlib.sha256(data.read_bytes()).hexdigest()}


def test_output_directories_get_the_users_umask(workspace):
    work, models = workspace
    old = os.umask(0o022)
    try:
        merge(models, work / "shared-out", optimizer="sgd", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((work / "shared-out").stat().st_mode) == 0o755


def test_staging_left_by_a_dead_process_is_removed_by_a_later_run_in_the_same_parent(workspace):
    work, models = workspace
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = work / f".ame-tmp-{pid}-some-other-output-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = work / f".ame-tmp-{os.getpid()}-running-xyz"
    alive.mkdir()
    merge(models, work / "unrelated-name", optimizer="sgd", progress=False)
    assert not stale.exists()
    assert alive.exists()  # a process that still runs keeps its staging directory


# -- interrupted merges --------------------------------------------------------------------------

def _staging(parent: Path):
    return list(parent.glob(".ame-tmp-*"))


def test_sigint_mid_merge_cleans_up_and_rerun_succeeds(big_ingredients, tmp_path):
    out = tmp_path / "out"
    # 40 epochs: the streaming takes seconds, so the signal lands mid-merge (3 took 0.2 s on an idle machine).
    proc = start_cli("merge", *big_ingredients, "--out", out, "--optimizer", "adam", "--lr", "1e-3", "--epochs", "40",
                     "--quiet")
    wait_for(lambda: any((s / "model.safetensors").exists() for s in _staging(tmp_path)))
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not _staging(tmp_path)
    assert main(["merge", *map(str, big_ingredients), "--out", str(out), "--optimizer", "sgd", "--quiet"]) == 0


def test_sigkill_mid_merge_keeps_previous_output(big_ingredients, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ame_config.yaml").write_text("# a previous ame-hf output\n")
    (out / "previous.txt").write_text("previous")
    proc = start_cli("merge", *big_ingredients, "--out", out, "--overwrite", "--optimizer", "adam", "--lr", "1e-3",
                     "--epochs", "40", "--quiet")
    wait_for(lambda: any((s / "model.safetensors").exists() for s in _staging(tmp_path)))
    time.sleep(0.3)
    proc.kill()
    proc.communicate(timeout=60)
    assert (out / "previous.txt").read_text() == "previous" and len(list(out.iterdir())) == 2
    assert _staging(tmp_path)  # a killed process cannot clean up ...
    assert main(["merge", *map(str, big_ingredients), "--out", str(out), "--overwrite", "--optimizer", "sgd",
                 "--quiet"]) == 0
    assert not _staging(tmp_path)  # ... but the next run removes what dead runs left
    assert (out / "model.safetensors").is_file() and not (out / "previous.txt").exists()


@pytest.mark.parametrize("stop", ["exit", "SIGINT", "SIGTERM"])
def test_a_process_removes_its_temp_dirs_when_it_stops(tmp_path, stop):
    """`process_temp_dir` folders (the Space's work folders) go when their process exits, by Ctrl-C (SIGINT) or
    SIGTERM too, and only those: another live process's folder stays, and SIGTERM still ends the process."""
    script = (
        "import sys, time\n"
        "from ame_hf.output import clean_up_temp_dirs, process_temp_dir\n"
        "clean_up_temp_dirs('ame-hf-test-')\n"
        "folder = process_temp_dir('ame-hf-test-')\n"
        "(folder / 'merged').mkdir()\n"
        "(folder / 'merged' / 'model.safetensors').write_bytes(b'weights')\n"
        "print(folder, flush=True)\n"
        "sys.stdin.readline() if sys.argv[1] == 'exit' else time.sleep(120)\n"
    )
    other = tmp_path / "ame-hf-test-1-other"  # pid 1 (init) is alive: never this process's
    other.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", script, stop], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, preexec_fn=default_ctrl_c)
    try:
        folder = Path(proc.stdout.readline().strip())
        assert folder.parent == tmp_path and (folder / "merged" / "model.safetensors").is_file()
        if stop == "exit":
            proc.stdin.write("\n")
            proc.stdin.flush()
        else:
            proc.send_signal(getattr(signal, stop))
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert not folder.exists() and other.is_dir()
    assert code == {"exit": 0, "SIGINT": -signal.SIGINT, "SIGTERM": -signal.SIGTERM}[stop]  # as without ame-hf


_SCRATCH_USERS = {  # a Python API call that keeps a scratch folder while it runs, and the folder's prefix
    "from_pretrained": ("import ame_hf\n"
                        "model = ame_hf.from_pretrained(sys.argv[1:3], optimizer='sgd', progress=False)\n"
                        "print(model.ame_result.path.parent, flush=True)\n", "ame-hf-model-"),
    "adapter": ("from ame_hf.full_models import FullModels, resolve_models\n"
                "full = FullModels(resolve_models(sys.argv[1:2], base=sys.argv[2]))\n"
                "print(full.path(0).parent, flush=True)\n", "ame-hf-adapters-"),
}


@pytest.mark.parametrize("user", sorted(_SCRATCH_USERS))
def test_the_python_apis_scratch_folders_go_on_sigterm_and_after_a_kill(request, tmp_path, user):
    """`from_pretrained`'s merge and an adapter's full model (evaluate, tune) live in `process_temp_dir` folders:
    SIGTERM removes them, and the next call removes what a killed process left."""
    script, prefix = _SCRATCH_USERS[user]
    if user == "adapter":
        lm = request.getfixturevalue("lm_adapters")
        args = [lm["adapters"][0], lm["base"]]
    else:
        args = request.getfixturevalue("finetunes")[:2]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{prefix}{dead.pid}-left"
    stale.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time\n" + script + "time.sleep(120)\n",
                             *map(str, args)], env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE,
                            text=True)
    try:
        folder = Path(proc.stdout.readline().strip())
        assert folder.parent == tmp_path and folder.name.startswith(f"{prefix}{proc.pid}-"), folder
        assert any(folder.iterdir()) and not stale.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert not folder.exists()


def test_stale_temp_dirs_are_those_of_dead_processes_of_this_user(tmp_path):
    from ame_hf.output import remove_stale_dirs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"ame-hf-test-{dead.pid}-x"
    live = tmp_path / f"ame-hf-test-{os.getpid()}-y"
    kept = [live, tmp_path / "ame-hf-test-notes", tmp_path / "ame-hf-test-12ab-z", tmp_path / "other"]
    for folder in (stale, *kept):
        folder.mkdir()
        (folder / "file").write_text("x")
    (tmp_path / f"ame-hf-test-{dead.pid}-link").symlink_to(tmp_path / "other", target_is_directory=True)
    assert remove_stale_dirs(tmp_path, "ame-hf-test-") == [stale]
    assert not stale.exists() and all((folder / "file").is_file() for folder in kept)
