"""Tokenizers, chat templates and processor files (ame_hf/vocabulary.py): `check` notes every difference by
file and field, and `--tokenizer-source` decides where the output's come from (tested with AutoTokenizer)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from ame_hf import check
from ame_hf.cli import main
from factories import make_finetunes, tiny_tokenizer

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture()
def two_tokenizers(tmp_path):
    """Two BERT fine-tunes with the same vocabulary, other special tokens, and a chat template in one."""
    a, b = make_finetunes(tmp_path / "ft", n=2, kind="bert", vocab_size=len(tiny_tokenizer()))
    tiny_tokenizer().save_pretrained(a)
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(b)
    config = json.loads((b / "tokenizer_config.json").read_text())
    config["pad_token"] = "[SEP]"
    (b / "tokenizer_config.json").write_text(json.dumps(config))
    return a, b


def test_check_notes_tokenizer_differences_by_file_and_field(two_tokenizers):
    a, b = two_tokenizers
    report = check([a, b])
    assert report.ok, report.errors
    assert any("special token pad_token (tokenizer_config.json)" in n and "'[PAD]'" in n and "'[SEP]'" in n
               for n in report.notes), report.notes
    assert any("chat template" in n and f"only in {b}" in n for n in report.notes), report.notes


@pytest.mark.parametrize("source,expected", [(None, "a"), ("first", "a"), ("1", "b"), ("ref", "b")])
def test_tokenizer_source_decides_the_output_tokenizer(two_tokenizers, tmp_path, source, expected):
    a, b = two_tokenizers
    if source == "ref":
        only = tmp_path / "just-a-tokenizer"
        only.mkdir()
        for f in b.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                (only / f.name).write_bytes(f.read_bytes())
        source = str(only)
    out = tmp_path / "out"
    args = ["merge", str(a), str(b), "--out", str(out), "--quiet", "--optimizer", "sgd"]
    assert main(args + (["--tokenizer-source", source] if source else [])) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token == ("[PAD]" if expected == "a" else "[SEP]")
    assert (tok.chat_template == TEMPLATE) == (expected == "b")
    assert tok.convert_tokens_to_ids("red") == tiny_tokenizer().convert_tokens_to_ids("red")


def test_a_tokenizer_source_index_out_of_range_is_one_line(two_tokenizers, tmp_path, capsys):
    a, b = two_tokenizers
    capsys.readouterr()
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "o"), "--tokenizer-source", "5"]) == 1
    assert "tokenizer_source index 5 is out of range" in capsys.readouterr().err
