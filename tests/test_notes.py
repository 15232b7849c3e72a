"""What `check` notes (issue 21 item 9): every difference said once, listing who has which value (never once per
pair of ingredients), `generation_config.json` fields named with whose file the output takes, and plain grammar."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from ame_hf import check, merge
from factories import make_finetunes, tiny_tokenizer


def edit_json(file, **changes):
    data = json.loads(file.read_text()) if file.is_file() else {}
    data.update(changes)
    file.write_text(json.dumps(data))


def test_generation_config_differences_are_noted_once_naming_whose_file_the_output_takes(tmp_path):
    a, b, c = make_finetunes(tmp_path / "ft", n=3)
    edit_json(b / "generation_config.json", temperature=0.7, do_sample=True)
    edit_json(c / "generation_config.json", temperature=0.7, do_sample=True, suppress_tokens=list(range(40)))
    report = check([a, b, c])
    assert report.ok, report.errors
    notes = [n for n in report.notes if n.startswith("generation_config.json")]
    assert f"generation_config.json temperature: {a} has none; {b}, {c} have 0.7; the output takes {a}'s" in notes
    assert any(n.startswith("generation_config.json suppress_tokens:") and "(40 items)" in n for n in notes), notes
    assert len(notes) == 3, notes  # temperature, do_sample, suppress_tokens: each once
    # The output's file is the one the note names: the pivot's ingredient when it is one.
    report = check([a, b, c], pivot=2)
    assert any(n.startswith("generation_config.json temperature:") and n.endswith(f"takes {c}'s") for n in report.notes)
    out = merge([a, b, c], tmp_path / "out", optimizer="adam", lr=1e-3, pivot=2, progress=False).path
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.7


def test_a_generation_config_only_some_have_is_noted(tmp_path):
    a, b = make_finetunes(tmp_path / "ft", n=2)
    (b / "generation_config.json").unlink()
    notes = check([a, b]).notes
    assert f"generation_config.json: {a} has one; {b} has none; the output takes {a}'s" in notes, notes


def test_a_config_difference_is_one_note_listing_who_differs(tmp_path):
    a, b, c = make_finetunes(tmp_path / "ft", n=3)
    edit_json(a / "config.json", max_position_embeddings=64)
    notes = [n for n in check([a, b, c]).notes if "max_position_embeddings" in n]
    assert notes == [f"config max_position_embeddings: {a} has 64; {b}, {c} have 32; the output takes {a}'s"]


def test_tokenizer_and_dtype_differences_are_one_note_each(tmp_path):
    a, b, c = make_finetunes(tmp_path / "ft", n=3, vocab_size=len(tiny_tokenizer()))
    for folder in (a, b, c):
        tiny_tokenizer().save_pretrained(folder)
    edit_json(a / "tokenizer_config.json", pad_token="[SEP]")
    state = load_file(a / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, a / "model.safetensors", metadata={"format": "pt"})
    report = check([a, b, c], dtype="float32")
    assert report.ok, report.errors
    pads = [n for n in report.notes if "pad_token" in n]
    assert pads == [f"special token pad_token (tokenizer_config.json): {a} has '[SEP]'; {b}, {c} have '[PAD]'"]
    dtypes = [n for n in report.notes if n.startswith("tensor(s)")]
    assert len(dtypes) == 1 and f"{a} has 'BF16'; {b}, {c} have 'F32'" in dtypes[0], dtypes


def test_a_union_without_new_tokens_says_so(tmp_path):
    tok = tiny_tokenizer()
    wide = make_finetunes(tmp_path / "wide", n=1, vocab_size=24)[0]
    narrow = make_finetunes(tmp_path / "narrow", n=1, vocab_size=len(tok))[0]
    for folder in (wide, narrow):
        tok.save_pretrained(folder)
    report = check([wide, narrow])
    assert report.ok, report.errors
    note = next(n for n in report.notes if "vocabularies differ" in n)
    assert "union of 15 tokens and 9 padding rows (no new token)" in note and "new: )" not in note, note
