"""Pushing a merge output to the Hub (ame_hf/push.py) against the tests' local Hub server: the `push` command
and `push_to_hub`, an unchanged re-push, one-line push errors that keep the output and say how to retry, and
an interrupted push."""

from __future__ import annotations

import signal

from huggingface_hub import HfApi

from ame_hf import merge, push_to_hub
from ame_hf.cli import main
from factories import cli_error_line, start_cli, wait_for, weights_sha256


def test_push_command_and_api(repos, hub, hub_token, tmp_path, capsys):
    result = merge(["org/hub-a", "org/hub-b"], tmp_path / "m", progress=False)
    capsys.readouterr()
    assert main(["push", str(result.path), "--repo-id", "org/pushed", "--token", hub_token, "--private"]) == 0
    assert "org/pushed" in capsys.readouterr().out
    api = HfApi(token=hub_token)
    assert api.model_info("org/pushed").private
    other = merge(["org/hub-a", "org/hub-b"], tmp_path / "m2", optimizer="sgd", progress=False)
    url = push_to_hub(other, "org/pushed", token=hub_token, create_pr=True)
    assert "discussions" in url
    assert any(ref.ref.startswith("refs/pr/") for ref in api.list_repo_refs("org/pushed", include_pull_requests=True).pull_requests)


def test_push_errors_keep_the_output(repos, hub_token, tmp_path, capsys):
    result = merge(["org/hub-a", "org/hub-b"], tmp_path / "m", progress=False)
    line = cli_error_line(capsys, "push", result.path, "--repo-id", "elsewhere/x", "--token", "hf_read_token",
                          needles=("403", "ame-hf push"), max_seconds=10)
    assert "hf_read_token" not in line
    cli_error_line(capsys, "push", result.path, "--repo-id", "org/x", needles=("no Hub token",), max_seconds=10)
    assert (result.path / "model.safetensors").is_file()


def test_pushing_an_unchanged_output_again_says_nothing_changed(repos, hub_token, tmp_path, capsys):
    result = merge(["org/hub-a", "org/hub-b"], tmp_path / "m", progress=False)
    capsys.readouterr()
    assert main(["push", str(result.path), "--repo-id", "org/repushed", "--token", hub_token]) == 0
    assert capsys.readouterr().out.startswith("pushed to ")
    head = HfApi(token=hub_token).repo_info("org/repushed").sha
    assert main(["push", str(result.path), "--repo-id", "org/repushed", "--token", hub_token]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nothing changed: org/repushed already holds exactly this output") and head in out, out
    assert HfApi(token=hub_token).repo_info("org/repushed").sha == head


def test_push_retry_hint_keeps_the_target(repos, tmp_path, capsys):
    result = merge(["org/hub-a", "org/hub-b"], tmp_path / "m", progress=False)
    line = cli_error_line(capsys, "push", result.path, "--repo-id", "elsewhere/x", "--token", "hf_read_token",
                          "--create-pr", "--revision", "dev", "--private", needles=("403",), max_seconds=10)
    assert f"retry with `ame-hf push {result.path} --repo-id elsewhere/x --private --revision dev --create-pr`" in line


def test_sigint_mid_push_keeps_local_output(big_ingredients, hub, hub_token, tmp_path):
    out = tmp_path / "out"
    assert main(["merge", *map(str, big_ingredients), "--out", str(out), "--optimizer", "sgd", "--quiet"]) == 0
    before = weights_sha256(out)
    seen = len(hub.requests)
    proc = start_cli("push", out, "--repo-id", "user/interrupted", "--token", hub_token)
    wait_for(lambda: any("preupload" in r.path or "lfs" in r.path for r in hub.requests[seen:]))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err
    assert weights_sha256(out) == before
    assert main(["push", str(out), "--repo-id", "user/interrupted", "--token", hub_token]) == 0


def test_a_push_replaces_the_weights_an_earlier_push_left(repos, hub_token, tmp_path):
    """A sharded output pushed over a single-file one: the old model.safetensors is deleted in the same commit
    (it stayed beside the new index, and transformers could load the stale file)."""
    single = merge(["org/hub-a", "org/hub-b"], tmp_path / "single", optimizer="sgd", progress=False)
    sharded = merge(["org/hub-a", "org/hub-b"], tmp_path / "sharded", optimizer="sgd", max_shard_size="20KB",
                    progress=False)
    assert main(["push", str(single.path), "--repo-id", "org/reshaped", "--token", hub_token, "--quiet"]) == 0
    assert main(["push", str(sharded.path), "--repo-id", "org/reshaped", "--token", hub_token, "--quiet"]) == 0
    files = set(HfApi(token=hub_token).list_repo_files("org/reshaped"))
    local = {p.name for p in sharded.path.iterdir()}
    assert "model.safetensors" not in files and {f for f in files if f.endswith(".safetensors")} == {
        f for f in local if f.endswith(".safetensors")}, files
