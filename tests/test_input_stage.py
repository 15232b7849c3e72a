"""The input stage (ame_hf/inputs.py) holds its shape: every reference of a run resolved once, each file fetched
once, each config, tokenizer and safetensors header parsed once, the report built once; evaluate, tune and the
greedy soup refuse bad input before any weight is downloaded; keywords mean the same everywhere."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

import ame_hf
from ame_hf import _model_files, checkpoint, compatibility
from factories import make_finetunes, tiny_tokenizer


@pytest.fixture(scope="module")
def stage_repos(hub, hub_token, lm_adapters, tmp_path_factory):
    """org/st-base (the adapters' base), org/st-ft1 and org/st-ft2 (full fine-tunes), org/st-lora (a LoRA adapter
    naming org/st-base), org/st-tok (a model whose tokenizer is the tokenizer source)."""
    root = tmp_path_factory.mktemp("stage")
    api = HfApi(token=hub_token)
    fts = make_finetunes(root / "fts", n=2, scale=0.05)
    for ft in fts:
        tiny_tokenizer().save_pretrained(ft)
    lora = root / "lora"
    shutil.copytree(lm_adapters["adapters"][0], lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/st-base"}))
    folders = {"org/st-base": lm_adapters["base"], "org/st-ft1": fts[0], "org/st-ft2": fts[1], "org/st-lora": lora,
               "org/st-tok": lm_adapters["full"]}
    for repo_id, folder in folders.items():
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder)
    return folders


def _counting(monkeypatch, module, name):
    """Count the calls of `module.name` (still calling it)."""
    calls: Counter = Counter()
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls[str(args[0])] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_merge_resolves_fetches_and_parses_each_input_once(stage_repos, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))  # a fresh cache: every file really fetched
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    headers = _counting(monkeypatch, checkpoint, "read_header")
    configs = _counting(monkeypatch, _model_files, "read_config")
    import ame_hf.inputs as inputs

    monkeypatch.setattr(inputs, "read_config", _model_files.read_config)
    monkeypatch.setattr(checkpoint, "read_config", _model_files.read_config)
    tokenizers = _counting(monkeypatch, inputs, "read_tokenizer")
    seen = len(hub.requests)
    result = ame_hf.merge(["org/st-ft1", "org/st-ft2", "org/st-lora"], tmp_path / "out", optimizer="sgd",
                          tokenizer_source="org/st-tok", progress=False)
    requests = hub.requests[seen:]
    api = [r.path.split("?")[0] for r in requests if r.path.startswith("/api/models/")]
    info = Counter(p.split("/revision/")[0] for p in api if "/tree/" not in p)
    assert info == {f"/api/models/org/{n}": 1 for n in ("st-ft1", "st-ft2", "st-lora", "st-base", "st-tok")}, info
    listings = Counter(p.split("/tree/")[0] for p in api if "/tree/" in p)  # snapshot_download's file list
    assert max(listings.values()) == 1, listings
    gets = Counter(r.path.split("?")[0] for r in requests if r.method == "GET" and "/resolve/" in r.path
                   and r.bytes_sent)
    twice = {p: n for p, n in gets.items() if n > 1 and not p.endswith(".safetensors")}
    assert not twice, f"fetched more than once: {twice}"
    weights = {p for p in gets if p.endswith(".safetensors")}
    assert not any("st-tok" in p for p in weights), "the tokenizer source's weights were downloaded"
    # each local safetensors header parsed once, each config.json once, each tokenizer folder once
    assert headers and max(headers.values()) == 1, headers
    assert configs and max(configs.values()) == 1, configs
    assert tokenizers and max(tokenizers.values()) == 1, tokenizers
    # the report the result keeps is the one the check made: the adapter's note is in it
    assert any("LoRA adapter" in n for n in result.report.notes), result.report.notes
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged and all(torch.isfinite(t).all() for t in merged.values())


def test_evaluating_a_hub_adapter_resolves_and_loads_it_once(stage_repos, lm_adapters, hub, tmp_path, monkeypatch):
    """`evaluate` of one Hub LoRA adapter: one model_info per repo (adapter and base), each config parsed once, the
    adapter's factors loaded once (before: 3 model_info calls, 5 config parses, 3 loads of the factors)."""
    import huggingface_hub.constants as constants

    import ame_hf.adapters as adapters
    import ame_hf.inputs as inputs

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    configs = _counting(monkeypatch, _model_files, "read_config")
    monkeypatch.setattr(inputs, "read_config", _model_files.read_config)
    monkeypatch.setattr(checkpoint, "read_config", _model_files.read_config)
    factors = _counting(monkeypatch, adapters, "_load_adapter_tensors")
    seen = len(hub.requests)
    result = ame_hf.evaluate(["org/st-lora"], data=lm_adapters["val"])
    api = [r.path.split("?")[0] for r in hub.requests[seen:] if r.path.startswith("/api/models/")]
    info = Counter(p.split("/revision/")[0] for p in api if "/tree/" not in p)
    assert info == {"/api/models/org/st-lora": 1, "/api/models/org/st-base": 1}, info
    assert sum(factors.values()) == 1, factors
    assert configs and max(configs.values()) == 1, configs
    assert result.scores[0][0] == "org/st-lora" and result.scores[0][1] > 0
