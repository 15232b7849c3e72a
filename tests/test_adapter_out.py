"""Adapters out (issue 27): `save_as="adapter"` writes a merge as a PEFT LoRA adapter of its base. Checked against
peft itself: `PeftModel.from_pretrained(base, out).merge_and_unload()` against ame-hf's full merge output, and
against peft's own `add_weighted_adapter(..., combination_type="cat")`; the card's reported errors against the
measured ones; the bytes against another block size."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ame_hf
from ame_hf import AmeConfig, InvalidConfigError
from ame_hf._lora_factors import factor_delta, relative_error
from factories import (assert_one_error_line, load_state, make_finetunes, make_lora_adapter, run_cli, save_base)

SOUP = {"optimizer": "sgd"}


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What peft makes of an adapter folder: merge_and_unload() over the base, as a state dict."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


def _reported_errors(out: Path) -> dict[str, tuple[int, float]]:
    """module -> (rank, relative error) from the card's "LoRA adapter" table."""
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \| ([0-9.e+-]+) \| ", (out / "README.md").read_text(), re.M)
    return {m: (int(r), float(e)) for m, r, e in rows}


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory) -> dict:
    """A tiny llama base and two LoRA adapters of it (ranks 4 and 2, overlapping targets, no modules_to_save)."""
    root = tmp_path_factory.mktemp("loras")
    base = save_base(root / "base")
    adapters = [make_lora_adapter(base, root / "a", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 1,
                                  scale=0.3),
                make_lora_adapter(base, root / "b", dict(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj"]), 2,
                                  scale=0.3)]
    full = ame_hf.merge(adapters, root / "full", progress=False, **SOUP).path
    return {"root": root, "base": base, "adapters": adapters, "full": full}


def test_a_soup_of_loras_is_exact_as_an_adapter(two_loras, tmp_path):
    """Rank of each merged delta <= the sum of the adapters' ranks: the adapter reproduces ame-hf's full merge
    to float rounding, and peft's own `cat` combination of the two adapters (weights 1/2 each)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapters = two_loras["base"], two_loras["adapters"]
    result = ame_hf.merge(adapters, tmp_path / "out", save_as="adapter", progress=False, **SOUP)
    out = result.path
    assert [p.name for p in out.glob("*.safetensors")] == ["adapter_model.safetensors"]
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.realpath(base) and config["peft_type"] == "LORA"
    assert config["lora_alpha"] == config["r"] and all(config["alpha_pattern"][k] == v
                                                      for k, v in config["rank_pattern"].items())
    # q_proj holds both adapters (rank 4 + 2), v_proj and k_proj one each.
    ranks = {m: r for m, (r, _) in _reported_errors(out).items()}
    assert ranks == {f"model.layers.{i}.self_attn.{p}": r for i in range(2) for p, r in
                     (("q_proj", 6), ("v_proj", 4), ("k_proj", 2))}
    full = load_state(two_loras["full"])
    ours = _peft_merged(base, out)
    scale = max(float(t.abs().max()) for t in full.values())
    assert _max_diff(ours, full) <= 4 * torch.finfo(torch.float32).eps * scale
    # peft's own: the two adapters concatenated with weights 1/2 (a soup of two is their mean delta).
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name="a")
    model.load_adapter(adapters[1], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "cat", combination_type="cat")
    model.set_adapter("cat")
    cat = {k: v.detach() for k, v in model.merge_and_unload(adapter_names=["cat"]).state_dict().items()}
    assert _max_diff(ours, cat) <= 4 * torch.finfo(torch.float32).eps * scale
    # With a rank cap at the sum of the ranks, the same adapter.
    capped = ame_hf.merge(adapters, tmp_path / "capped", save_as="adapter", adapter_rank=6, progress=False, **SOUP)
    assert (capped.path / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()
    assert "save_as: adapter" in (out / "ame_config.yaml").read_text()


def test_the_recorded_config_reproduces_the_adapter(two_loras, tmp_path, capsys):
    out = ame_hf.merge(two_loras["adapters"], tmp_path / "out", save_as="adapter", adapter_energy=0.9,
                       progress=False, **SOUP).path
    code, _, err = run_cli(capsys, "merge", "--config", str(out / "ame_config.yaml"), "-o", str(tmp_path / "again"),
                           "-q")
    assert code == 0, err
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (
        out / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "again" / "adapter_config.json").read_text() == (out / "adapter_config.json").read_text()
    reproduce = (out / "README.md").read_text().split("## Reproduce", 1)[1]
    assert "--save-as adapter --adapter-energy 0.9" in reproduce and "save_as: adapter" in reproduce


def test_full_finetunes_as_an_adapter_report_the_error_they_have(tmp_path):
    """A LoRA extracted from a merge of full fine-tunes (lossy at rank 2): each module's reported error is the
    error measured on what peft loads; the changed norms and embeddings are saved whole, exactly."""
    base = save_base(tmp_path / "base")
    fts = make_finetunes(tmp_path, n=2, scale=0.02)
    full = ame_hf.merge(fts, tmp_path / "full", progress=False, **SOUP).path
    out = ame_hf.merge(fts, tmp_path / "out", save_as="adapter", adapter_rank=2, base=base, progress=False,
                       **SOUP).path
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and "model.norm" in config["modules_to_save"]
    assert "model.embed_tokens" in config["modules_to_save"] and "lm_head" in config["target_modules"]
    merged, reference, start = _peft_merged(base, out), load_state(full), load_state(base)
    reported = _reported_errors(out)
    assert len(reported) == len(config["target_modules"]) == 15  # 7 linear layers x 2 blocks + lm_head
    for module, (rank, error) in reported.items():
        name = f"{module}.weight"
        delta = reference[name].double() - start[name].double()
        measured = float((merged[name].double() - reference[name].double()).norm() / delta.norm())
        assert rank == 2 and 0.1 < error < 1 and measured == pytest.approx(error, rel=1e-3), module
    for name in ("model.norm.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(merged[name], reference[name])
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card and "randomized" not in card


def test_an_energy_threshold_keeps_that_share_of_each_delta(tmp_path):
    base = save_base(tmp_path / "base")
    fts = make_finetunes(tmp_path, n=2, scale=0.02)
    out = ame_hf.merge(fts, tmp_path / "out", save_as="adapter", adapter_energy=0.5, base=base, progress=False,
                       **SOUP).path
    config = json.loads((out / "adapter_config.json").read_text())
    reported = _reported_errors(out)
    ranks = {r for r, _ in reported.values()}
    assert len(ranks) > 1 and config["r"] == max(ranks)  # ranks differ by module: rank_pattern / alpha_pattern
    assert all(e <= 0.5 ** 0.5 + 1e-6 for _, e in reported.values())
    full = ame_hf.merge(fts, tmp_path / "full", progress=False, **SOUP).path
    merged, reference, start = _peft_merged(base, out), load_state(full), load_state(base)
    for module, (rank, error) in reported.items():  # what peft loads is as far from the merge as the card says
        name = f"{module}.weight"
        delta = reference[name].double() - start[name].double()
        measured = float((merged[name].double() - reference[name].double()).norm() / delta.norm())
        assert measured == pytest.approx(error, rel=1e-3), module


def test_new_vocabulary_rows_are_saved_whole_and_load_on_the_resized_base(tmp_path):
    """An adapter and a fine-tune that added a token (`examples/adapters/run.py`): the output's embeddings and head
    (new rows included) are `modules_to_save`, its tokenizer has the new token, and peft loads it on the base
    resized to that tokenizer as ame-hf's full merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    example = Path(__file__).parents[1] / "examples" / "adapters" / "run.py"
    subprocess.run([sys.executable, str(example), "--out", str(tmp_path / "ex")], check=True, capture_output=True)
    refs = [tmp_path / "ex" / "adapter-0", tmp_path / "ex" / "full-ft"]
    out = ame_hf.merge(refs, tmp_path / "out", save_as="adapter", progress=False, **SOUP).path
    full = load_state(ame_hf.merge(refs, tmp_path / "full", progress=False, **SOUP).path)
    config = json.loads((out / "adapter_config.json").read_text())
    assert {"model.embed_tokens", "lm_head"} <= set(config["modules_to_save"]) and config["target_modules"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "ex" / "base")
    assert len(tokenizer) == full["lm_head.weight"].shape[0] > base.config.vocab_size
    base.resize_token_embeddings(len(tokenizer))
    merged = {k: v.detach() for k, v in PeftModel.from_pretrained(base, out).merge_and_unload().state_dict().items()}
    assert _max_diff(merged, full) <= 4 * torch.finfo(torch.float32).eps * max(float(t.abs().max())
                                                                              for t in full.values())
    assert "resize_token_embeddings" in (out / "README.md").read_text()


def test_a_tied_head_stays_tied_to_the_saved_embeddings(tmp_path):
    """A model whose head is its input embeddings (stored once): the changed embeddings are saved with the head as
    their copy and peft's `ensure_weight_tying`, so what peft loads is ame-hf's full merge, head included."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_base(tmp_path / "base", tie_word_embeddings=True)
    fts = make_finetunes(tmp_path, n=2, tie_word_embeddings=True)
    out = ame_hf.merge(fts, tmp_path / "out", save_as="adapter", base=base, progress=False, **SOUP).path
    full = AutoModelForCausalLM.from_pretrained(ame_hf.merge(fts, tmp_path / "full", progress=False, **SOUP).path)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] and {"lm_head", "model.embed_tokens"} <= set(config["modules_to_save"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).merge_and_unload()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, full.lm_head.weight)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert float((model(tokens).logits - full(tokens).logits).abs().max()) < 1e-5


def test_without_a_base_it_refuses_in_one_line_before_the_merge(tmp_path, capsys):
    fts = make_finetunes(tmp_path, n=2)
    with pytest.raises(InvalidConfigError, match="needs the base model"):
        ame_hf.merge(fts, tmp_path / "out", save_as="adapter", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".ame-tmp-*"))
    code, _, err = run_cli(capsys, "merge", *map(str, fts), "-o", str(tmp_path / "out"), "--save-as", "adapter")
    assert_one_error_line(code, err, "--base")
    code, _, err = run_cli(capsys, "merge", *map(str, fts), "-o", str(tmp_path / "out"), "--adapter-rank", "4")
    assert_one_error_line(code, err, "--adapter-rank", "--save-as", exit_code=2)
    with pytest.raises(InvalidConfigError, match="adapter_energy"):
        AmeConfig(save_as="adapter", adapter_energy=1.5)


def test_the_space_merge_tab_saves_an_adapter(two_loras, tmp_path):
    """The Merge tab's Save as / Adapter rank / Adapter energy boxes (0 and blank: the defaults) reach `merge`."""
    from ame_hf._space_forms import adapter_options
    from ame_hf.space_merge import run_merge

    options = {"optimizer": "sgd", **adapter_options("adapter", 0, "")}
    view = run_merge("\n".join(map(str, two_loras["adapters"])), options, tmp_path)
    assert (view.folder / "adapter_config.json").is_file() and "save_as: adapter" in view.config_yaml
    assert "## LoRA adapter" in view.card_markdown
    here = ame_hf.merge(two_loras["adapters"], tmp_path / "here", save_as="adapter", progress=False, **SOUP).path
    assert (view.folder / "adapter_model.safetensors").read_bytes() == (here / "adapter_model.safetensors").read_bytes()


def test_the_adapter_bytes_do_not_depend_on_the_block_size(two_loras, tmp_path):
    adapters = [str(a) for a in two_loras["adapters"]]
    ours = ame_hf.merge(adapters, tmp_path / "here", save_as="adapter", progress=False, **SOUP).path
    env = {**os.environ, "AME_HF_BLOCK_ELEMENTS": "40"}
    subprocess.run([sys.executable, "-m", "ame_hf", "merge", *adapters, "-o", str(tmp_path / "there"), "-q",
                    "--optimizer", "sgd", "--save-as", "adapter"], check=True, env=env, capture_output=True)
    digest = lambda p: hashlib.sha256((p / "adapter_model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(ours) == digest(tmp_path / "there")


def test_big_matrices_use_a_randomized_svd_with_its_error_measured():
    """Above the exact-SVD size, with a rank cap: torch.svd_lowrank (seeded: the same factors every time), exact on
    a delta of lower rank, and the reported error is the stored factors' measured one."""
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(1300, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 1100, generator=gen,
                                                                                dtype=torch.float64)
    f = factor_delta(low, torch.float32, cap=8, energy=None, floor=1e-6)
    assert f.method == "randomized SVD" and f.rank == 3 and f.error < 1e-6
    noisy = low + 0.1 * torch.randn(1300, 1100, generator=gen, dtype=torch.float64)
    g = factor_delta(noisy, torch.float32, cap=8, energy=None, floor=1e-6)
    again = factor_delta(noisy, torch.float32, cap=8, energy=None, floor=1e-6)
    assert g.rank == 8 and torch.equal(g.A, again.A) and torch.equal(g.B, again.B)
    measured = float((noisy - g.B.double() @ g.A.double()).norm() / noisy.norm())
    s = torch.linalg.svdvals(noisy)
    best = float(s[8:].norm() / s.norm())  # the error of the exact rank-8 truncation (Eckart-Young)
    assert g.error == pytest.approx(measured, rel=1e-9) and best <= g.error < 1.01 * best
    # Without a cap: a sketch when the delta's rank is reached within it (lossless), else the exact SVD.
    lossless = factor_delta(low, torch.float32, cap=None, energy=None, floor=1e-6)
    assert lossless.method == "randomized SVD" and lossless.rank == 3 and lossless.error < 1e-6
    full = factor_delta(noisy, torch.float32, cap=None, energy=None, floor=1e-6)
    assert full.method == "exact SVD" and full.rank == 1100 and full.error < 1e-6
    exact = factor_delta(noisy[:, :1000], torch.float32, cap=8, energy=None, floor=1e-6)
    assert exact.method == "exact SVD" and relative_error(noisy[:, :1000], exact.B, exact.A) == exact.error


def test_tune_writes_its_pick_as_an_adapter(lm_adapters, tmp_path):
    """`tune` with `save_as="adapter"` scores full models as always, then writes the selected one as a (lossless)
    adapter of the adapters' base: what peft loads from it is the selected model, rebuilt independently."""
    from ame_hf.adapter_out import full_model_config
    from ame_hf.tuning import tune

    adapters, base = lm_adapters["adapters"], lm_adapters["base"]
    result = tune(adapters, tmp_path / "best", data=lm_adapters["val"], budget=1, progress=False,
                  config=AmeConfig(save_as="adapter"))
    out, best = result.path, result.best
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    if best.ingredient is not None:
        selected = load_state(lm_adapters["references"][best.ingredient])
    else:
        refs = [adapters[i] for i in best.kept] if best.kept is not None else adapters
        config = full_model_config(best.config) if best.kept is None else AmeConfig.soup()
        selected = load_state(ame_hf.merge(refs, tmp_path / "selected", config, progress=False).path)
    assert _max_diff(_peft_merged(base, out), selected) < 1e-6
    card = (out / "README.md").read_text()
    assert "## LoRA adapter" in card and "Selection by" in card and "save_as: adapter" in (
        out / "ame_config.yaml").read_text()


def test_a_hub_base_is_recorded_with_its_revision(two_loras, hub, hub_token, tmp_path):
    """Adapters and their base on the (local) Hub: the adapter names the base by repo ID and its resolved commit,
    the card links it as the adapter's base, and the weights are those of the same merge from local folders."""
    from huggingface_hub import HfApi, ModelCard

    api = HfApi(token=hub_token)
    api.create_repo("org/ao-base", exist_ok=True)
    sha = api.upload_folder(repo_id="org/ao-base", folder_path=two_loras["base"]).oid
    repos = []
    for i, adapter in enumerate(two_loras["adapters"]):
        folder = tmp_path / f"up{i}"
        folder.mkdir()
        config = {**json.loads((adapter / "adapter_config.json").read_text()), "base_model_name_or_path": "org/ao-base"}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
        api.create_repo(f"org/ao-lora-{i}", exist_ok=True)
        api.upload_folder(repo_id=f"org/ao-lora-{i}", folder_path=folder)
        repos.append(f"org/ao-lora-{i}")
    out = ame_hf.merge(repos, tmp_path / "out", save_as="adapter", token=hub_token, progress=False, **SOUP).path
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/ao-base" and config["revision"] == sha
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/ao-base" and card.data.base_model_relation == "adapter"
    local = ame_hf.merge(two_loras["adapters"], tmp_path / "local", save_as="adapter", progress=False, **SOUP).path
    assert (out / "adapter_model.safetensors").read_bytes() == (local / "adapter_model.safetensors").read_bytes()
