"""The Hub round trip against the tests' local Hub server: pull by ID/branch/tag/sha, check,
merge -> push -> download -> from_pretrained, the model card, and one-line Hub errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from huggingface_hub import HfApi, ModelCard, snapshot_download
from safetensors import safe_open

from ame_hf import check, merge, push_to_hub
from ame_hf.cli import main
from ame_hf.errors import HubError, IngredientNotFoundError
from ame_hf.fetch import resolve_ref
from factories import load_state, make_finetunes


def upload(api: HfApi, repo_id: str, folder, **kwargs) -> str:
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, **kwargs).oid


@pytest.fixture(scope="module")
def repos(hub, hub_token, tmp_path_factory):
    """org/hub-a (main + branch `v2` + tag `v1`), org/hub-b, org/hub-wide (other shapes), org/hub-bert."""
    root = tmp_path_factory.mktemp("hubmodels")
    api = HfApi(token=hub_token)
    a, b, a2 = make_finetunes(root / "ab", n=3)
    (a / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a\n")
    (b / "README.md").write_text("---\nlicense: apache-2.0\n---\n# b\n")
    shas = {"a-main": upload(api, "org/hub-a", a), "b": upload(api, "org/hub-b", b)}
    api.create_tag("org/hub-a", tag="v1")
    api.create_branch("org/hub-a", branch="v2")
    shas["a-v2"] = upload(api, "org/hub-a", a2, revision="v2")
    wide = make_finetunes(root / "wide", n=1, intermediate_size=48)[0]
    upload(api, "org/hub-wide", wide)
    bert = make_finetunes(root / "bert", n=1, kind="bert")[0]
    upload(api, "org/hub-bert", bert)
    upload(api, "org/hub-gated", b)
    hub.set_gated("org/hub-gated", True)
    return {"dirs": {"a": a, "b": b, "a2": a2}, "shas": shas}


def test_pull_by_id_branch_tag_and_sha(repos):
    shas, dirs = repos["shas"], repos["dirs"]
    cases = [("org/hub-a", shas["a-main"], "a"), ("org/hub-a@v1", shas["a-main"], "a"),
             ("org/hub-a@v2", shas["a-v2"], "a2"), (f"org/hub-a@{shas['a-v2']}", shas["a-v2"], "a2")]
    for ref, sha, local in cases:
        ing = resolve_ref(ref)
        assert ing.sha == sha and re.fullmatch(r"[0-9a-f]{40}", ing.sha), ref
        assert (ing.path / "model.safetensors").read_bytes() == (dirs[local] / "model.safetensors").read_bytes(), ref
        assert ing.repo_id == "org/hub-a" and ing.pinned_ref == f"org/hub-a@{sha}"


def test_merge_push_download_round_trip(repos, hub_token, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    capsys.readouterr()
    code = main(["merge", "org/hub-a", "org/hub-b", "org/hub-a@v2", "--out", str(out), "--push",
                 "--repo-id", "user/merged", "--token", hub_token, "--quiet", "--shuffle", "--seed", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "pushed to" in captured.out and "user/merged" in captured.out
    local = snapshot_download("user/merged", token=hub_token)
    for name in ("model.safetensors", "config.json", "ame_config.yaml", "README.md"):
        assert open(os.path.join(local, name), "rb").read() == (out / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(local)
    state = load_state(out)
    assert all((v == state[k]).all() for k, v in model.state_dict().items())

    card = ModelCard.load(os.path.join(local, "README.md"))
    shas = repos["shas"]
    data = card.data.to_dict()
    assert data["base_model"] == ["org/hub-a", "org/hub-b"]
    assert data["base_model_relation"] == "merge"
    assert {"ame-hf", "merge", "model-ensembling"} <= set(data["tags"])
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"  # branch v2 keeps main's card: all agree
    for sha in (shas["a-main"], shas["b"], shas["a-v2"]):
        assert sha in card.text
    for needle in ("arXiv 2508.14832".replace(" ", ":"), "Lee & Ngo", "`Adam`", "betas", "relative: 0.005",
                   "shuffle / seed | True / 3", "epoch 1:", "torch ",
                   "safetensors ", "ame_hf_version"):
        assert needle in card.text, needle
    assert hub_token not in card.text and "--token" not in card.text
    # Reproduce names resolved shas (never the branch v2) and no push option.
    command = next(line for line in card.text.splitlines() if line.startswith("ame-hf merge org/"))
    assert command.startswith(f"ame-hf merge org/hub-a@{shas['a-main']} org/hub-b@{shas['b']} "
                              f"org/hub-a@{shas['a-v2']} --out merged "), command
    assert "--shuffle" in command and "--seed 3" in command
    assert not any(opt in command for opt in ("@v2", "--push", "--repo-id", "--token", "--quiet")), command
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["ame_optimizer"] == "adam"
    yaml_text = (out / "ame_config.yaml").read_text()
    assert f"org/hub-a@{shas['a-main']}" in yaml_text and hub_token not in yaml_text


def test_license_only_when_ingredients_agree(repos, tmp_path):
    result = merge(["org/hub-a", "org/hub-b"], tmp_path / "m", progress=False)
    assert ModelCard.load(result.path / "README.md").data.license == "apache-2.0"
    local = make_finetunes(tmp_path / "local", n=1)[0]  # no card, so no licence to agree on
    result = merge(["org/hub-a", str(local)], tmp_path / "m2", progress=False)
    card = ModelCard.load(result.path / "README.md")
    assert card.data.license is None and card.data.base_model == ["org/hub-a"]


def test_reproduce_from_pinned_config(repos, tmp_path, capsys):
    first = merge(["org/hub-a@v2", "org/hub-b"], tmp_path / "first", optimizer="adagrad", lr=0.01, progress=False)
    assert main(["merge", "--config", str(first.path / "ame_config.yaml"), "--out", str(tmp_path / "again"),
                 "--quiet"]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (first.path / "model.safetensors").read_bytes()


def test_pivot_base_model_from_hub_is_in_base_model(repos, tmp_path):
    result = merge(["org/hub-a", "org/hub-b"], tmp_path / "m", pivot="org/hub-a@v2", progress=False)
    card = ModelCard.load(result.path / "README.md")
    assert card.data.base_model == ["org/hub-a", "org/hub-b"]  # pivot repo already listed
    assert repos["shas"]["a-v2"] in card.text


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


def test_check_reports_differences_by_name(repos, capsys):
    report = check(["org/hub-a", "org/hub-wide"])
    # Shapes decide errors; the config key that made them is a note, and named in the summary.
    assert not report.ok and any("intermediate_size" in n for n in report.notes)
    assert "intermediate_size" in report.summary()
    assert any("mlp.up_proj.weight" in e and "[32, 16]" in e and "[48, 16]" in e for e in report.errors)
    capsys.readouterr()
    assert main(["check", "org/hub-a", "org/hub-bert"]) == 1
    out = capsys.readouterr().out
    assert "model_type" in out and "'llama'" in out and "'bert'" in out
    assert "missing tensor(s)" in out and "lm_head.weight" in out
    assert main(["check", "org/hub-a", "org/hub-b"]) == 0


def _one_line_error(capsys, *args, expect=()):
    capsys.readouterr()
    started = time.perf_counter()
    code = main(list(args))
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    # Download progress bars of ingredients fetched before the failure are not error output.
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line
             and not line.startswith("INFO: ")]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("ame-hf: error:"), err
    for needle in expect:
        assert needle in lines[0], lines[0]
    assert elapsed < 10, f"took {elapsed:.1f}s"
    return lines[0]


def test_hub_errors_are_one_clear_line_and_fast(repos, hub, tmp_path, capsys):
    out = str(tmp_path / "o")
    _one_line_error(capsys, "merge", "org/hub-a", "org/does-not-exist", "--out", out,
                    expect=("org/does-not-exist", "not found"))
    _one_line_error(capsys, "merge", "org/hub-a", "org/hub-b@nope", "--out", out, expect=("'nope'", "revision"))
    line = _one_line_error(capsys, "merge", "org/hub-a", "org/hub-b", "--out", out, "--token", "hf_bad_canary",
                           expect=("401", "token"))
    assert "hf_bad_canary" not in line
    _one_line_error(capsys, "merge", "org/hub-a", "org/hub-gated", "--out", out, expect=("gated", "accept"))
    assert not os.path.exists(out)
    with pytest.raises(IngredientNotFoundError):
        resolve_ref("org/does-not-exist")


def test_push_errors_keep_the_output(repos, hub_token, tmp_path, capsys):
    result = merge(["org/hub-a", "org/hub-b"], tmp_path / "m", progress=False)
    line = _one_line_error(capsys, "push", str(result.path), "--repo-id", "elsewhere/x", "--token", "hf_read_token",
                           expect=("403", "ame-hf push"))
    assert "hf_read_token" not in line
    _one_line_error(capsys, "push", str(result.path), "--repo-id", "org/x", expect=("no Hub token",))
    assert (result.path / "model.safetensors").is_file()


def test_unreachable_endpoint_fails_fast(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ame_hf", "merge", "org/a", "org/b", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "cannot reach http://127.0.0.1:9" in lines[0]
    assert elapsed < 20, f"took {elapsed:.1f}s"  # a bound on hanging, not a speed measurement
    assert issubclass(HubError, OSError)  # so callers catching OSError also catch it


def test_offline_mode_uses_the_cache(repos, tmp_path):
    merge(["org/hub-a", "org/hub-b"], tmp_path / "online", progress=False)  # fills the cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "offline"
    proc = subprocess.run([sys.executable, "-m", "ame_hf", "merge", "org/hub-a", "org/hub-b", "--out", str(out),
                           "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "online" / "model.safetensors").read_bytes()
    assert repos["shas"]["a-main"] in (out / "ame_config.yaml").read_text()
    proc = subprocess.run([sys.executable, "-m", "ame_hf", "merge", "org/hub-a", "org/never-downloaded", "--out",
                           str(tmp_path / "o2")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "org/never-downloaded" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr


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
    line = _one_line_error(capsys, "push", str(result.path), "--repo-id", "elsewhere/x", "--token", "hf_read_token",
                           "--create-pr", "--revision", "dev", "--private", expect=("403",))
    assert f"retry with `ame-hf push {result.path} --repo-id elsewhere/x --private --revision dev --create-pr`" in line
