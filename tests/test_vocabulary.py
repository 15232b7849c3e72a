"""Tokenizers, chat templates and processor files (ame_hf/vocabulary.py): `check` notes every difference by
file and field, and `--tokenizer-source` decides where the output's come from (tested with AutoTokenizer)."""

from __future__ import annotations

import json

import torch

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


def test_one_compatibility_check_reads_each_tokenizer_once(two_tokenizers, monkeypatch):
    """The vocabulary plan and the tokenizer notes share one read of each ingredient's tokenizer files."""
    import ame_hf.compatibility as compatibility
    from ame_hf.checkpoint import Checkpoint

    reads = []
    real = compatibility.read_tokenizer
    monkeypatch.setattr(compatibility, "read_tokenizer", lambda path: reads.append(path) or real(path))
    report = compatibility.check_compatibility([Checkpoint(p) for p in two_tokenizers])
    assert any("chat template" in n for n in report.notes), report.notes
    assert sorted(map(str, reads)) == sorted(map(str, two_tokenizers))


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
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "o"), "--tokenizer-source", "5"]) == 2
    assert "--tokenizer-source index 5 is out of range" in capsys.readouterr().err


# -- extended vocabularies: rows matched by token string --------------------------------------------


@pytest.fixture()
def extended(tmp_path):
    """Three fine-tunes of one tiny Llama: one as is, two that added tokens (in other orders, so the same
    token has other ids), each with its tokenizer."""
    import torch
    from transformers import AddedToken

    from factories import build_base

    base_tok = tiny_tokenizer()
    torch.manual_seed(0)
    plans = [[], ["<|im_start|>", "<x>"], ["<x>", "<pad2>", "<|im_start|>"]]
    folders = []
    for i, added in enumerate(plans):
        model = build_base("llama", vocab_size=len(base_tok))
        tok = tiny_tokenizer()
        tok.add_tokens([AddedToken(t, special=t.startswith("<|")) for t in added])
        model.resize_token_embeddings(len(tok))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        folder = tmp_path / f"ft{i}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(folder)
    return folders


def _rows(folder):
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    return state["model.embed_tokens.weight"].double(), state["lm_head.weight"].double()


def test_union_soup_row_is_the_mean_over_the_ingredients_that_have_the_token(extended, tmp_path):
    out = tmp_path / "union"
    assert main(["merge", *map(str, extended), "--out", str(out), "--quiet", "--optimizer", "sgd"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    toks = [AutoTokenizer.from_pretrained(f) for f in extended]
    embed, head = _rows(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == embed.shape[0] == len(tok) == 18
    inputs = [_rows(f) for f in extended]
    for token, row in tok.get_vocab().items():
        assert tok.convert_tokens_to_ids(token) == row
        owners = [i for i, t in enumerate(toks) if token in t.get_vocab()]
        assert owners, token
        for k, out_rows in enumerate((embed, head)):
            expected = sum(inputs[i][k][toks[i].convert_tokens_to_ids(token)] for i in owners) / len(owners)
            assert torch.allclose(out_rows[row], expected, atol=1e-6), (token, owners)
    # the source's tokens keep their ids; the others' new tokens follow, in ingredient order
    assert [tok.convert_ids_to_tokens(i) for i in range(15, 18)] == ["<|im_start|>", "<x>", "<pad2>"]
    assert tok.convert_tokens_to_ids("red") == toks[0].convert_tokens_to_ids("red")
    assert tok.added_tokens_decoder[15].special and not tok.added_tokens_decoder[17].special
    table = (out / "README.md").read_text().split("## Ingredients")[1].split("**Pivot**")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows[0].endswith("| full checkpoint |") and "adds 2 tokens" in rows[1] and "adds 3 tokens" in rows[2], rows


def test_tokenizer_source_index_keeps_that_vocabulary_exactly(extended, tmp_path):
    out = tmp_path / "exact"
    assert main(["merge", *map(str, extended), "--out", str(out), "--quiet", "--optimizer", "sgd",
                 "--tokenizer-source", "2"]) == 0
    tok, source = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(extended[2])
    assert tok.get_vocab() == source.get_vocab()
    embed, _ = _rows(out)
    assert embed.shape[0] == len(source)
    pad2 = source.convert_tokens_to_ids("<pad2>")  # only ft2 has it: its row, unchanged
    assert torch.allclose(embed[pad2], _rows(extended[2])[0][pad2], atol=1e-6)


def test_a_differing_vocabulary_without_a_tokenizer_is_refused(extended, tmp_path, capsys):
    for f in extended[1].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "added_tokens")):
            f.unlink()
    capsys.readouterr()
    assert main(["merge", *map(str, extended), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{extended[1]} has no tokenizer" in err, err


def test_adam_on_extended_vocabularies_runs_and_keeps_shared_rows_near_the_soup(extended, tmp_path):
    soup = tmp_path / "soup"
    adam = tmp_path / "adam"
    assert main(["merge", *map(str, extended), "--out", str(soup), "--quiet", "--optimizer", "sgd"]) == 0
    assert main(["merge", *map(str, extended), "--out", str(adam), "--quiet"]) == 0
    a, s = _rows(adam)[0], _rows(soup)[0]
    assert a.shape == s.shape and not torch.equal(a, s)
    assert float((a - s).abs().max()) < 0.05  # the default is a small step from the soup


def test_extended_vocabularies_are_bit_identical_over_two_processes(extended, tmp_path):
    import os
    import subprocess
    import sys

    from factories import weights_sha256

    common = ["--relative-lr", "0.1", "--shuffle", "--epochs", "2", "--max-shard-size", "8KB", "--device", "cpu",
              "--quiet"]
    assert main(["merge", *map(str, extended), "--out", str(tmp_path / "one"), *common]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ame_hf",
           "merge", *map(str, extended), "--out", str(tmp_path / "two"), *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(weights_sha256(tmp_path / "one")) > 2 and weights_sha256(tmp_path / "one") == weights_sha256(tmp_path / "two")


def test_a_tokenizer_source_ref_keeps_its_vocabulary_with_rows_from_the_ingredients(extended, tmp_path):
    only = tmp_path / "tokenizer-of-ft2"
    only.mkdir()
    for f in extended[2].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (only / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "ref"
    assert main(["merge", *map(str, extended), "--out", str(out), "--quiet", "--optimizer", "sgd",
                 "--tokenizer-source", str(only)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(extended[2]).get_vocab()
    # the same rows as with --tokenizer-source 2: the tokenizer is ft2's
    assert main(["merge", *map(str, extended), "--out", str(tmp_path / "idx"), "--quiet", "--optimizer", "sgd",
                 "--tokenizer-source", "2"]) == 0
    assert torch.equal(_rows(out)[0], _rows(tmp_path / "idx")[0])


def test_pivot_and_tokenizer_source_keywords_mean_the_same_in_check_merge_api_and_yaml(extended, tmp_path,
                                                                                       monkeypatch):
    """`--tokenizer-source pivot` with `--pivot 2` keeps ingredient 2's vocabulary (it took ingredient 0's before),
    alike in check, the CLI, the Python API and a YAML that sits beside folders named like the keywords."""
    import ame_hf

    source = AutoTokenizer.from_pretrained(extended[2])
    report = check(extended, pivot=2, tokenizer_source="pivot")
    assert report.ok and any(f"keeps the {len(source)} tokens of {extended[2]}" in n for n in report.notes), \
        report.notes
    cli = tmp_path / "cli"
    assert main(["merge", *map(str, extended), "--out", str(cli), "--quiet", "--pivot", "2",
                 "--tokenizer-source", "pivot"]) == 0
    api = ame_hf.merge(extended, tmp_path / "api", pivot=2, tokenizer_source="pivot", progress=False)
    monkeypatch.chdir(tmp_path)
    for word in ("pivot", "first", "union", "mean"):  # folders named like the keywords, beside the YAML
        (tmp_path / word).mkdir()
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("ingredients: [ft0, ft1, ft2]\npivot: 2\ntokenizer_source: pivot\n")
    assert main(["merge", "--config", str(yaml_file), "--out", str(tmp_path / "yaml"), "--quiet"]) == 0
    for out in (cli, api.path, tmp_path / "yaml"):
        assert AutoTokenizer.from_pretrained(out).get_vocab() == source.get_vocab(), out
        assert _rows(out)[0].shape[0] == len(source)
    assert (cli / "model.safetensors").read_bytes() == (tmp_path / "yaml" / "model.safetensors").read_bytes()


def test_the_default_merge_of_extended_vocabularies_reads_each_byte_once_within_max_memory(extended, tmp_path,
                                                                                          monkeypatch):
    """The token-indexed tensors' groups of rows, read by the relative lr's spread pass, are kept for the steps
    when they fit --max-memory (each input byte read once); with less, the first groups that fit beside the
    largest one, being read (here, in blocks of 4 rows of the 15 rows all three share, 3 x 4 x 16 float32 each:
    three at 3 KiB, one at 2 KiB, none at 1 KiB). The bytes written are the same."""
    from collections import Counter

    import ame_hf.plan as plan
    from ame_hf import merge
    from ame_hf.checkpoint import Checkpoint
    from factories import load_state, weights_sha256

    inputs = sum(t.numel() * t.element_size() for p in extended for t in load_state(p).values())
    whole = merge(extended, tmp_path / "whole", progress=False)
    assert whole.bytes_read == inputs
    read, counted = Checkpoint.read, Counter()

    def counting(self, name, rows=None, dtype=None):  # the real read, its values counted per tensor
        values = read(self, name, rows, dtype)
        counted[name] += values.numel() * self.info(name).dtype.itemsize
        return values

    monkeypatch.setattr(Checkpoint, "read", counting)
    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 64)
    embed = (15 + 17 + 18) * 16 * 4  # the three embeddings' bytes
    block = 3 * 4 * 16 * 4
    for budget, expected in (("128MiB", embed), ("3KiB", 2 * embed - 3 * block), ("2KiB", 2 * embed - block),
                             ("1KiB", 2 * embed)):
        counted.clear()
        done = merge(extended, tmp_path / budget, progress=False, max_memory=budget)
        assert counted["model.embed_tokens.weight"] == counted["lm_head.weight"] == expected, (budget, counted)
        assert weights_sha256(done.path) == weights_sha256(whole.path)
