"""`merge` end to end (ame_hf/merging.py): Hub ingredients -> merge -> push -> download -> from_pretrained,
the same bytes over runs, from the YAML and across processes (torchrun, `accelerate launch`), and remote code
in an ingredient never copied or run."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard, snapshot_download
from safetensors import safe_open

import ame_hf
from ame_hf import AmeConfig, merge
from ame_hf.cli import main
from ame_hf.errors import InvalidConfigError
from factories import load_state, make_finetunes, weights_sha256


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


# A date (2024-05-31) or a time of day (13:05:59): what a clock would leave in an output.
_CLOCK = re.compile(r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}:\d{2}:\d{2}\b")


def test_three_runs_and_yaml_reproduction_are_identical(tmp_path):
    paths = make_finetunes(tmp_path / "ft", n=4)
    cfg = AmeConfig(optimizer="nadam", relative_lr=0.05, shuffle=True, seed=11, epochs=2, batch_size=2)
    hashes = [weights_sha256(merge(paths, tmp_path / f"run{i}", cfg, progress=False).path) for i in range(3)]
    assert hashes[0] == hashes[1] == hashes[2]
    assert main(["merge", "--config", str(tmp_path / "run0" / "ame_config.yaml"), "--out", str(tmp_path / "yaml"),
                 "--quiet"]) == 0
    assert weights_sha256(tmp_path / "yaml") == hashes[0]
    # The card has versions but no clock: the weights never depend on time.
    cards = [(tmp_path / f"run{i}" / "README.md").read_text().replace(f"run{i}", "RUN") for i in range(3)]
    assert f"ame-hf {ame_hf.__version__}" in cards[0] and f"torch {torch.__version__}" in cards[0]
    assert cards[0] == cards[1] == cards[2]  # three runs at three moments: nothing in the card tells them apart
    with safe_open(tmp_path / "run0" / "model.safetensors", "pt") as f:
        stamp = f.metadata()
    assert stamp["ame_hf"] == ame_hf.__version__  # the weights carry the version too ...
    today = datetime.date.today().isoformat()
    for text in (cards[0], (tmp_path / "run0" / "ame_config.yaml").read_text(), json.dumps(stamp)):
        assert today not in text and not _CLOCK.search(text), _CLOCK.search(text)  # ... and no time either


def _torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ame_hf", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_processes_are_bit_identical_to_one(tmp_path):
    paths = make_finetunes(tmp_path / "ft", n=3, max_shard_size="10KB")
    # On the CPU explicitly, so that the comparison holds on a GPU machine too (tests/test_devices.py).
    common = ["--optimizer", "adam", "--relative-lr", "0.1", "--shuffle", "--epochs", "2", "--max-shard-size", "12KB",
              "--device", "cpu"]
    one = tmp_path / "one"
    assert main(["merge", *map(str, paths), "--out", str(one), "--quiet", *common]) == 0
    two = tmp_path / "two"
    proc = _torchrun("merge", *paths, "--out", two, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Both processes really worked (balanced by bytes), then one output was published.
    assert "process 1 of 2" in proc.stderr and "process 2 of 2" in proc.stderr
    assert "process 2 of 2 on cpu: 0 tensor" not in proc.stderr
    assert len(weights_sha256(one)) > 2  # several shards + index
    assert weights_sha256(one) == weights_sha256(two)
    assert (one / "ame_config.yaml").read_text() == (two / "ame_config.yaml").read_text()
    assert not list(tmp_path.glob(".ame-tmp-*"))


def test_accelerate_launch_on_cpu(tmp_path):
    paths = make_finetunes(tmp_path / "ft", n=2)
    assert main(["merge", *map(str, paths), "--out", str(tmp_path / "one"), "--quiet", "--device", "cpu"]) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "ame_hf", "merge", *map(str, paths), "--out", str(tmp_path / "two"), "--device", "cpu"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 2 of 2" in proc.stderr
    assert weights_sha256(tmp_path / "one") == weights_sha256(tmp_path / "two")


def test_remote_code_is_never_copied_or_run(tmp_path, capsys):
    paths = make_finetunes(tmp_path / "ft", n=2)
    marker = tmp_path / "code-ran"
    for p in paths:
        cfg = json.loads((p / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
        (p / "config.json").write_text(json.dumps(cfg))
        (p / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    out = tmp_path / "out"
    assert main(["merge", *map(str, paths), "--out", str(out)]) == 0
    assert "auto_map" in capsys.readouterr().err  # warned
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert not list(out.glob("*.py")) and not marker.exists()
    from ame_hf import from_pretrained

    with pytest.raises(InvalidConfigError, match="trust_remote_code"):
        from_pretrained(paths, model_kwargs={"trust_remote_code": True})
