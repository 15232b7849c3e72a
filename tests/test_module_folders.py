"""Sentence-transformers models whose modules hold weights (issue 21 item 1): a `Dense` module's `2_Dense/` weights
are part of the model, checked across the ingredients and merged by the same AME run into the output's module
folder. Checked on what `SentenceTransformer` loads: every module's weights against the float64 mean and the
whole-model Adam reference of the loaded ingredients, and an encoded sentence."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ame_hf import AmeConfig, check, merge
from factories import cli_error_line, tiny_bert_config, tiny_tokenizer
from test_engine import reference_ame_states

SENTENCE = "the red cat sits on a big dog"


def build_st(folder, seed: int, *, out_features: int = 8, dense: bool = True, pooling: str = "mean",
             safe: bool = True, scale: float = 0.05):
    """A tiny BERT `Transformer` + `Pooling` + `Dense` + `Normalize` model: one base (seed 0), moved by seeded noise."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertModel

    tok = tiny_tokenizer()
    bert = folder.parent / f"{folder.name}-bert"
    torch.manual_seed(0)
    BertModel(tiny_bert_config(vocab_size=len(tok))).save_pretrained(bert)
    tok.save_pretrained(bert)
    encoder = Transformer(str(bert))
    modules = [encoder, Pooling(16, pooling_mode=pooling)]
    if dense:
        torch.manual_seed(1)
        modules.append(Dense(16, out_features))
    model = SentenceTransformer(modules=[*modules, Normalize()], device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save(str(folder), safe_serialization=safe)
    shutil.rmtree(bert)
    return folder


@pytest.fixture(scope="module")
def sts(tmp_path_factory):
    root = tmp_path_factory.mktemp("st-modules")
    return [build_st(root / f"st{i}", 10 + i) for i in range(3)]


def loaded(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def floats(model):
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def assert_loads_as(out, expected, atol=1e-6):
    """`SentenceTransformer(out)` holds `expected` in every module, and encodes as a model holding it does."""
    merged = loaded(out)
    state = floats(merged)
    assert set(state) == set(expected) and any(k.startswith("2.linear") for k in state), sorted(state)
    for name, value in expected.items():
        assert torch.allclose(state[name].double(), value.double(), atol=atol), name
    reference = loaded(out)
    reference.load_state_dict({k: v.float() for k, v in expected.items()}, strict=False)
    got, want = merged.encode([SENTENCE]), reference.encode([SENTENCE])
    assert got.shape == (1, 8) and abs(got - want).max() < 1e-5


def test_the_soup_merges_every_module_folders_weights(sts, tmp_path):
    report = check(sts)
    assert report.ok, report.errors
    out = merge(sts, tmp_path / "soup", optimizer="sgd", progress=False).path
    assert sorted(p.name for p in (out / "2_Dense").iterdir()) == ["config.json", "model.safetensors"]
    states = [floats(loaded(s)) for s in sts]
    assert_loads_as(out, {k: sum(s[k].double() for s in states) / len(states) for k in states[0]})


@pytest.mark.parametrize("pivot", ["mean", "first", 2])
def test_adam_over_module_folders_equals_the_whole_model_reference(sts, tmp_path, pivot):
    config = AmeConfig(optimizer="adam", lr=0.01, epochs=2, pivot=pivot)
    out = merge(sts, tmp_path / "adam", config, progress=False).path
    assert_loads_as(out, reference_ame_states([floats(loaded(s)) for s in sts], config))


def test_a_pivot_checkpoint_lends_its_own_module_folder(sts, tmp_path):
    base = build_st(tmp_path / "base", 0, scale=0.0)
    config = AmeConfig(optimizer="adam", lr=0.01, pivot=str(base))
    out = merge(sts[:2], tmp_path / "adam", config, progress=False).path
    expected = reference_ame_states([floats(loaded(s)) for s in sts[:2]], config, floats(loaded(base)))
    assert_loads_as(out, expected)


def test_module_weights_stored_as_pytorch_model_bin_and_cut_in_blocks(sts, tmp_path, monkeypatch):
    from ame_hf import plan

    old = build_st(tmp_path / "old", 20, safe=False)
    assert (old / "2_Dense" / "pytorch_model.bin").is_file()
    whole = merge([old, *sts[:2]], tmp_path / "whole", optimizer="adam", lr=0.01, progress=False).path
    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 10)  # every module tensor in several blocks
    cut = merge([old, *sts[:2]], tmp_path / "cut", optimizer="adam", lr=0.01, progress=False).path
    assert (cut / "2_Dense" / "model.safetensors").read_bytes() == (whole / "2_Dense" / "model.safetensors").read_bytes()
    assert_loads_as(whole, reference_ame_states([floats(loaded(s)) for s in [old, *sts[:2]]],
                                                AmeConfig(optimizer="adam", lr=0.01)))


def test_module_folders_that_differ_are_refused_by_name(sts, tmp_path, capsys):
    wide = build_st(tmp_path / "wide", 30, out_features=4)
    report = check([sts[0], wide])
    assert not report.ok
    assert any("'linear.weight'" in e and f"{wide}/2_Dense" in e and "[4, 16]" in e for e in report.errors), report.errors
    plain = build_st(tmp_path / "plain", 31, dense=False)
    line = cli_error_line(capsys, "merge", sts[0], plain, "--out", tmp_path / "never", "--quiet",
                          needles=["module folders with weights differ", "2_Dense"])
    assert str(plain) in line
    nested = tmp_path / "nested"
    shutil.copytree(sts[1], nested)
    (nested / "2_Dense" / "sub").mkdir()
    shutil.copy(nested / "2_Dense" / "model.safetensors", nested / "2_Dense" / "sub" / "model.safetensors")
    cli_error_line(capsys, "merge", sts[0], nested, "--out", tmp_path / "never", "--quiet",
                   needles=[str(nested), "2_Dense", "sub/model.safetensors"])


def test_a_pivot_without_the_module_folders_is_refused_naming_the_keyword(sts, tmp_path, capsys):
    """The report's line names `pivot='mean'` for a Python caller; merge's one line shows `--pivot mean`."""
    plain = build_st(tmp_path / "plain", 32, dense=False)
    errors = check(sts[:2], pivot=str(plain)).errors
    assert any("choose pivot='mean' (or 'first', or an ingredient index)" in e for e in errors), errors
    line = cli_error_line(capsys, "merge", *sts[:2], "--pivot", plain, "--out", tmp_path / "never", "--quiet",
                          needles=["lacks the ingredients' module folder(s) 2_Dense", "choose --pivot mean (or"])
    assert "pivot=" not in line


def test_pooling_and_modules_differences_are_notes_naming_the_field(sts, tmp_path):
    cls = build_st(tmp_path / "cls", 40, pooling="cls")
    report = check([sts[0], cls, sts[1]])
    assert report.ok, report.errors
    assert any(n.startswith("1_Pooling/config.json pooling_mode:") and f"{cls} has 'cls'" in n
               and f"the output takes {sts[0]}'s" in n for n in report.notes), report.notes
    config = json.loads((sts[1] / "2_Dense" / "config.json").read_text())
    config["activation_function"] = "torch.nn.modules.linear.Identity"
    moved = tmp_path / "identity"
    shutil.copytree(sts[1], moved)
    (moved / "2_Dense" / "config.json").write_text(json.dumps(config))
    notes = check([sts[0], moved]).notes
    assert any("activation_function" in n and f"{moved}/2_Dense has" in n for n in notes), notes


def test_hub_module_folders_are_checked_from_headers_and_merged(sts, hub, hub_token, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    from factories import upload_to_hub

    wide = build_st(tmp_path / "wide", 30, out_features=4)
    repos = upload_to_hub(hub_token, {"org/st-dense-0": sts[0], "org/st-dense-1": sts[1], "org/st-dense-wide": wide})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))  # a fresh cache: every file really fetched
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    report = check([repos[0], repos[2]])
    assert not report.ok and any("org/st-dense-wide/2_Dense" in e for e in report.errors), report.errors
    repos = repos[:2]
    assert check(repos).ok
    assert not list((tmp_path / "cache").rglob("*.safetensors")), "the check downloaded weights"
    out = merge(repos, tmp_path / "hub", optimizer="sgd", progress=False).path
    assert list((tmp_path / "cache").rglob("2_Dense/model.safetensors"))
    states = [floats(loaded(s)) for s in sts[:2]]
    assert_loads_as(out, {k: (states[0][k].double() + states[1][k].double()) / 2 for k in states[0]})
