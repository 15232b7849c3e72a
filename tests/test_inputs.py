"""Know before you download (ame_hf/inputs.py, ame_hf/fetch.py): `check` and a failing `merge` read only
configs, tokenizer files and safetensors headers of Hub repos (counted in bytes the test Hub sent); a
passing merge announces the download and checks the disk first."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import HfApi

from ame_hf import check
from ame_hf.cli import main
from ame_hf.errors import CheckpointError, InsufficientSpaceError
from ame_hf.fetch import check_disk_space
from factories import make_finetunes

# ~22 MB of fp32 weights per repo: big enough that the headers are a small fraction of it.
SIZE = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.fixture(scope="module")
def big_repos(hub, hub_token, tmp_path_factory):
    root = tmp_path_factory.mktemp("big-repos")
    api = HfApi(token=hub_token)
    sizes = {}
    folders = {"org/size-a": make_finetunes(root / "ab", n=2, **SIZE)[0],
               "org/size-wide": make_finetunes(root / "wide", n=1, **{**SIZE, "intermediate_size": 640})[0]}
    folders["org/size-b"] = root / "ab" / "ft1"
    for repo_id, folder in folders.items():
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder)
        sizes[repo_id] = (folder / "model.safetensors").stat().st_size
    return sizes


def weight_bytes(hub, since: int) -> int:
    """Body bytes the Hub sent for weight files since request number `since`."""
    return sum(r.bytes_sent for r in hub.requests[since:] if r.path.split("?")[0].endswith(".safetensors"))


def test_check_reads_headers_not_weights(big_repos, hub, capsys):
    seen = len(hub.requests)
    report = check(["org/size-a", "org/size-b"])
    assert report.ok, report.errors
    sent = weight_bytes(hub, seen)
    total = big_repos["org/size-a"] + big_repos["org/size-b"]
    assert 0 < sent < 0.01 * total, f"check read {sent} of {total} weight bytes"
    seen = len(hub.requests)
    assert main(["check", "org/size-a", "org/size-wide"]) == 1
    assert "intermediate_size" in capsys.readouterr().out
    assert weight_bytes(hub, seen) < 0.01 * total


def test_incompatible_merge_fails_before_any_weight_is_downloaded(big_repos, hub, tmp_path, capsys):
    seen = len(hub.requests)
    out = tmp_path / "out"
    assert main(["merge", "org/size-a", "org/size-wide", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "incompatible" in err and "intermediate_size" in err, err
    assert weight_bytes(hub, seen) < 0.01 * (big_repos["org/size-a"] + big_repos["org/size-wide"])
    assert not out.exists()


def test_a_merge_announces_its_download_then_fetches_the_weights(big_repos, hub, tmp_path, capsys):
    seen = len(hub.requests)
    assert main(["merge", "org/size-a", "org/size-b", "--out", str(tmp_path / "m"), "--optimizer", "sgd"]) == 0
    err = capsys.readouterr().err
    assert "downloading 44.0MB of weights from 2 repo(s)" in err or "of weights from 2 repo(s)" in err, err
    assert weight_bytes(hub, seen) >= big_repos["org/size-a"] + big_repos["org/size-b"]


def test_a_download_the_disk_cannot_hold_is_refused_before_it_starts(tmp_path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(InsufficientSpaceError, match="need .* only .* is free"):
        check_disk_space(free + 1, tmp_path / "not" / "yet")
    check_disk_space(1, tmp_path)  # plenty: no error


def _upload(hub_token, repo_id, folder):
    api = HfApi(token=hub_token)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder)


def test_quantized_weights_are_refused_before_any_download(hub, hub_token, tmp_path, capsys):
    import json

    a, b = make_finetunes(tmp_path / "ft", n=2)
    config = json.loads((b / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (b / "config.json").write_text(json.dumps(config))
    _upload(hub_token, "org/quant-a", a)
    _upload(hub_token, "org/quant-gptq", b)
    seen = len(hub.requests)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["merge", "org/quant-a", "org/quant-gptq", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "org/quant-gptq is quantized with gptq" in err and "unquantized" in err, err
    assert weight_bytes(hub, seen) == 0  # config.json alone says no: not even a header is read
    assert main(["check", "org/quant-a", "org/quant-gptq"]) == 1
    assert "quantized with gptq" in capsys.readouterr().out


def test_fp8_tensors_are_refused_by_check(tmp_path):
    from safetensors.torch import load_file, save_file

    a, b = make_finetunes(tmp_path / "ft", n=2)
    state = load_file(b / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    save_file(state, b / "model.safetensors", metadata={"format": "pt"})
    report = check([a, b])
    assert not report.ok and any("F8_E4M3" in e and "quantized or FP8" in e for e in report.errors), report.errors


def test_a_model_type_only_the_repos_code_defines_is_refused(tmp_path):
    import json

    a, b = make_finetunes(tmp_path / "ft", n=2)
    for folder in (a, b):
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="my-secret-arch", architectures=["MySecretModel"],
                      auto_map={"AutoModelForCausalLM": "modeling_secret.MySecretModel"})
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "modeling_secret.py").write_text("raise SystemExit('never run')\n")
    report = check([a, b])
    assert not report.ok
    assert any("'my-secret-arch' is not part of transformers" in e and "never runs" in e for e in report.errors)


def test_config_keys_that_change_no_tensor_are_notes(tmp_path):
    import json

    a, b = make_finetunes(tmp_path / "ft", n=2)
    config = json.loads((b / "config.json").read_text())
    config.update(max_position_embeddings=64, num_beams=4, max_window_layers=7, num_experts_per_tok=2)
    (b / "config.json").write_text(json.dumps(config))
    report = check([a, b])
    assert report.ok, report.errors
    for key in ("max_position_embeddings", "num_beams", "max_window_layers", "num_experts_per_tok"):
        assert any(f"config {key}" in n for n in report.notes), key


def test_variant_weights_are_found_with_variant(hub, hub_token, tmp_path, capsys):
    from factories import load_state

    folders = make_finetunes(tmp_path / "ft", n=2)
    for folder in folders:
        (folder / "model.safetensors").rename(folder / "model.fp16.safetensors")
    capsys.readouterr()
    assert main(["check", *map(str, folders)]) == 1
    assert "pass --variant NAME" in capsys.readouterr().err
    with pytest.raises(CheckpointError) as caught:  # the same message names the keyword in Python
        check(folders)
    assert "pass variant=NAME" in str(caught.value) and "--variant" not in str(caught.value)
    _upload(hub_token, "org/variant-a", folders[0])
    _upload(hub_token, "org/variant-b", folders[1])
    out = tmp_path / "out"
    assert main(["merge", "org/variant-a", "org/variant-b", "--variant", "fp16", "--out", str(out), "--quiet",
                 "--optimizer", "sgd"]) == 0
    assert (out / "model.safetensors").is_file()  # the output uses the plain name save_pretrained writes
    assert main(["merge", *map(str, folders), "--variant", "fp16", "--out", str(tmp_path / "local"), "--quiet",
                 "--optimizer", "sgd"]) == 0
    assert load_state(out).keys() == load_state(tmp_path / "local").keys()


@pytest.mark.parametrize("case", ["missing data", "wrong task", "incompatible tune", "incompatible greedy soup"])
def test_evaluation_and_selection_refuse_before_any_weight_is_downloaded(case, big_repos, hub, tmp_path, capsys,
                                                                       monkeypatch):
    """evaluate, tune and the greedy soup go through the merge's input stage: a bad task, a missing data file or
    incompatible models are refused from the light files and headers, before a weight byte is sent."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # nothing cached: a download would show
    val = tmp_path / "val.txt"
    val.write_text("one two\n")
    argv = {"missing data": ["evaluate", "org/size-a", "--data", str(tmp_path / "nope.txt")],
            "wrong task": ["evaluate", "org/size-a", "--data", str(val), "--task", "image-classification"],
            "incompatible tune": ["tune", "org/size-a", "org/size-wide", "--data", str(val), "--out",
                                  str(tmp_path / "t")],
            "incompatible greedy soup": ["merge", "org/size-a", "org/size-wide", "--greedy-soup", "--eval-data",
                                         str(val), "--out", str(tmp_path / "g")]}[case]
    seen = len(hub.requests)
    assert main(argv + ["--quiet"]) in (1, 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert {"missing data": "nope.txt", "wrong task": "image-classification"}.get(case, "incompatible") in err, err
    assert weight_bytes(hub, seen) < 0.01 * (big_repos["org/size-a"] + big_repos["org/size-wide"]), err
    assert not (tmp_path / "t").exists() and not (tmp_path / "g").exists()
