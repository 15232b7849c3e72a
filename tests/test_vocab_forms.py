"""Vocabularies that are not one token per embedding row (issue 22 items 5 and 6): Qwen-style padded embeddings
with fine-tunes that added tokens inside the padding, T5 (a Unigram tokenizer, embeddings padded past it) and BART
(`final_logits_bias` is token-indexed too). The soup must equal the float64 mean by token (each row over the
ingredients that have its token; a padding row over those that have it as padding, by position), the output load
with no missing or unexpected key, and its tokenizer encode every token to its row."""

from __future__ import annotations

import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast

from ame_hf import check
from ame_hf.cli import main
from factories import perturb

WORDS = ["<pad>", "</s>", "<unk>", *(f"w{i}" for i in range(45))]  # 48 tokens


def word_tokenizer():
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def unigram_tokenizer():
    tok = Tokenizer(models.Unigram([(w, -float(i)) for i, w in enumerate(WORDS)], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def save_family(root, model_fn, tokenizer_fn, added, *, resize=None):
    """One base model (seeded), then per entry of `added` a fine-tune that added those tokens to the tokenizer
    (its embedding rows unchanged when they fit in the padding, else resized to `resize` or the token count),
    every float tensor perturbed."""
    paths = []
    for i, tokens in enumerate(added):
        torch.manual_seed(0)
        model = model_fn()
        tokenizer = tokenizer_fn()
        if tokens:
            tokenizer.add_tokens(tokens)
            if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(resize or len(tokenizer), mean_resizing=False)
        # BART's final_logits_bias is a buffer: moved too, so that a wrong row order shows
        perturb([*model.parameters(), *(b for n, b in model.named_buffers() if "final_logits_bias" in n)], 100 + i)
        path = root / f"ft{i}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def token_indexed(model):
    """name -> (tensor, dim): the loaded model's tensors with a row per token (input and output embeddings,
    BART's final_logits_bias on its last dim)."""
    rows = model.get_input_embeddings().weight.shape[0]
    out = {}
    for name, t in model.state_dict().items():
        dims = [d for d, s in enumerate(t.shape) if s == rows]
        if dims and ("embed" in name or "shared" in name or "lm_head" in name or "logits_bias" in name):
            out[name] = (t.double(), dims[-1])
    return out


def assert_soup_by_token(out, paths, auto_class):
    merged, info = auto_class.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    loaded = [auto_class.from_pretrained(p) for p in paths]
    toks = [AutoTokenizer.from_pretrained(p) for p in paths]
    out_tok = AutoTokenizer.from_pretrained(out)
    rows_out = merged.get_input_embeddings().weight.shape[0]
    vocab = out_tok.get_vocab()
    assert max(vocab.values()) < rows_out and len(set(vocab.values())) == len(vocab)
    for token, row in vocab.items():
        assert out_tok.convert_tokens_to_ids(token) == row
    token_rows = set(vocab.values())
    states = [token_indexed(m) for m in loaded]
    for name, (value, dim) in token_indexed(merged).items():
        for row in range(rows_out):
            if row in token_rows:
                token = out_tok.convert_ids_to_tokens(row)
                owners = [(s, t.get_vocab()[token]) for s, t in zip(states, toks) if token in t.get_vocab()]
            else:  # padding: by position, over the ingredients that have that row as padding
                owners = [(s, row) for s, t in zip(states, toks)
                          if row < s[name][0].shape[dim] and row not in set(t.get_vocab().values())]
            assert owners, (name, row)
            expected = sum(s[name][0].select(dim, r) for s, r in owners) / len(owners)
            assert torch.allclose(value.select(dim, row), expected, atol=1e-6), (name, row)
    others = [n for n in merged.state_dict() if n not in token_indexed(merged)]
    full = [{k: v.double() for k, v in m.state_dict().items()} for m in loaded]
    for name in others:
        expected = sum(s[name] for s in full) / len(full)
        assert torch.allclose(merged.state_dict()[name].double(), expected, atol=1e-6), name


def merge(paths, out, *extra):
    assert main(["merge", *map(str, paths), "--out", str(out), "--quiet", "--optimizer", "sgd", *extra]) == 0


def qwen():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=56, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        tie_word_embeddings=False))


@pytest.mark.parametrize("added", [
    [[], ["<a>", "<b>"]],                      # the first keeps its padding, the second added inside it
    [["<a>", "<b>"], [], ["<b>", "<c>"]],      # the source itself added tokens; another one collides on ids
    [[], ["<a>"], [f"<n{i}>" for i in range(10)]],  # one grew past the padding (resized to 64 rows)
])
def test_padded_vocabularies_merge_by_token_and_padding_by_position(tmp_path, added):
    from transformers import AutoModelForCausalLM

    paths = save_family(tmp_path / "in", qwen, word_tokenizer, added, resize=64)
    report = check(paths)
    assert report.ok, report.errors
    out = tmp_path / "out"
    merge(paths, out)
    assert_soup_by_token(out, paths, AutoModelForCausalLM)


def test_a_padded_vocabulary_names_its_padding_and_check_takes_the_tokenizer_source(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    paths = save_family(tmp_path / "in", qwen, word_tokenizer, [[], ["<a>", "<b>"]])
    report = check(paths)
    assert any("union of 50 tokens and 6 padding rows" in n for n in report.notes), report.notes
    capsys.readouterr()
    assert main(["check", *map(str, paths), "--tokenizer-source", "1"]) == 0
    assert f"keeps the 50 tokens and 6 padding rows of {paths[1]}" in capsys.readouterr().out
    out = tmp_path / "out"
    merge(paths, out, "--tokenizer-source", "1")
    assert_soup_by_token(out, paths, AutoModelForCausalLM)


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=56, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, decoder_start_token_id=0))


@pytest.mark.parametrize("added", [[[], ["<a>", "<b>"]], [["<a>"], ["<b>"], []]])
def test_t5_with_a_unigram_tokenizer_and_added_tokens(tmp_path, added):
    from transformers import AutoModelForSeq2SeqLM

    paths = save_family(tmp_path / "in", t5, unigram_tokenizer, added)
    report = check(paths)
    assert report.ok, report.errors
    merge(paths, tmp_path / "out")
    assert_soup_by_token(tmp_path / "out", paths, AutoModelForSeq2SeqLM)


def bart(rows=48):
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(vocab_size=rows, d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                                                   pad_token_id=0, bos_token_id=1, eos_token_id=1,
                                                   decoder_start_token_id=1, forced_eos_token_id=1))


@pytest.mark.parametrize("rows", [48, 56])  # resized to the tokens, or added inside a padded table of 56 rows
@pytest.mark.parametrize("source", [None, "1"])
def test_bart_final_logits_bias_is_matched_by_token_too(tmp_path, rows, source):
    """final_logits_bias ([1, vocab]) follows the vocabulary along its last dimension: matched by token like the
    embeddings (with equal row counts, merging it by index would have been a wrong merge)."""
    from transformers import AutoModelForSeq2SeqLM

    paths = save_family(tmp_path / "in", lambda: bart(rows), word_tokenizer, [[], ["<a>", "<b>"]])
    extra = ["--tokenizer-source", source] if source else []
    report = check(paths, **({"tokenizer_source": 1} if source else {}))
    assert report.ok, report.errors
    assert any("final_logits_bias" in n and "matched by token" in n for n in report.notes), report.notes
    merge(paths, tmp_path / "out", *extra)
    assert_soup_by_token(tmp_path / "out", paths, AutoModelForSeq2SeqLM)


def llama(rows=48):
    from factories import build_base

    return build_base("llama", vocab_size=rows)


def save_unresized(root):
    """`past`: a fine-tune that added '<a>' to its tokenizer without resizing its 48 embedding rows (the token's id,
    48, has no row); `grown`: one that added '<b>' and resized to 49 rows; `same`: the base tokenizer and rows."""
    folders = {}
    for i, (name, added, rows) in enumerate((("past", ["<a>"], 48), ("grown", ["<b>"], 49), ("same", [], 48))):
        torch.manual_seed(0)
        model, tokenizer = llama(), word_tokenizer()
        tokenizer.add_tokens(added)
        if rows > 48:
            model.resize_token_embeddings(rows, mean_resizing=False)
        perturb(model.parameters(), 200 + i)
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


@pytest.mark.parametrize("source", [None, "0"])
def test_a_source_tokenizer_whose_ids_reach_past_the_rows_is_refused_by_check(tmp_path, capsys, source):
    """The output's tokenizer from a fine-tune whose added token has no embedding row: `check` refuses it naming
    the tokenizer, the token, its id and what to do (it passed, then `finish` failed after the merge)."""
    from factories import cli_error_line

    folders = save_unresized(tmp_path / "in")
    refs, extra = [folders["past"], folders["grown"]], (["--tokenizer-source", source] if source else [])
    report = check(refs, **({"tokenizer_source": int(source)} if source else {}))
    assert not report.ok
    line = report.errors[0]
    assert f"tokenizer of {folders['past']}" in line and "'<a>' id 48" in line and "48 embedding rows" in line, line
    assert "tokenizer_source" in line and "resize_token_embeddings" in line, line
    line = cli_error_line(capsys, "merge", *refs, "--out", tmp_path / "out", "--optimizer", "sgd", *extra,
                          needles=[f"tokenizer of {folders['past']}", "--tokenizer-source"])
    assert not (tmp_path / "out").exists()


def test_an_ingredient_tokenizer_that_fits_its_rows_is_the_way_out(tmp_path):
    """With the resized fine-tune's tokenizer the merge goes: '<b>' is its row, the unresized one's '<a>' (which it
    cannot embed either) is no token of the output."""
    from transformers import AutoModelForCausalLM

    folders = save_unresized(tmp_path / "in")
    refs = [folders["past"], folders["grown"]]
    assert check(refs, tokenizer_source=1).ok
    merge(refs, tmp_path / "out", "--tokenizer-source", "1")
    assert "<a>" not in AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    assert_soup_by_token(tmp_path / "out", refs, AutoModelForCausalLM)


def test_a_tokenizer_source_whose_ids_reach_past_the_rows_of_agreeing_ingredients_is_refused(tmp_path):
    """Ingredients of one vocabulary, the tokenizer of another checkpoint (tokenizer_source=REF) with a token past
    their rows: refused, not an output whose tokenizer names a row it lacks."""
    folders = save_unresized(tmp_path / "in")
    shutil.copytree(folders["same"], tmp_path / "same2")
    report = check([folders["same"], tmp_path / "same2"], tokenizer_source=str(folders["past"]))
    assert not report.ok and "'<a>' id 48" in report.errors[0], report.errors
    assert check([folders["same"], tmp_path / "same2"], tokenizer_source=str(folders["same"])).ok


def test_a_tokenizer_source_of_other_ids_over_agreeing_ingredients_is_matched_by_token(tmp_path):
    """Ingredients of one vocabulary, the tokenizer of another checkpoint that gives the same tokens other ids (and
    lacks one): the output's rows follow that tokenizer, each merged from the ingredients' row of its token. Before,
    the rows were kept by position under the other tokenizer's ids: a silent wrong merge."""
    from transformers import AutoModelForCausalLM

    paths = save_family(tmp_path / "in", llama, word_tokenizer, [[], []])
    words = [*WORDS[:3], *reversed(WORDS[3:-1])]  # w0..w43 in reverse order; w44 left out
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(tmp_path / "other")
    report = check(paths, tokenizer_source=str(tmp_path / "other"))
    assert report.ok and any("matched by token" in n for n in report.notes), (report.errors, report.notes)
    merge(paths, tmp_path / "out", "--tokenizer-source", str(tmp_path / "other"))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").get_input_embeddings().weight.shape[0] == 47
    assert_soup_by_token(tmp_path / "out", paths, AutoModelForCausalLM)
