"""What a merge output holds beside its weights (ame_hf/finish.py): every side file and folder of the source
model (never code, never weights), so that a sentence-transformers model is still one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ame_hf import merge
from factories import tiny_bert_config, tiny_tokenizer


@pytest.fixture(scope="module")
def sentence_transformers_models(tmp_path_factory):
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertModel

    root = tmp_path_factory.mktemp("st")
    tok = tiny_tokenizer()
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        BertModel(tiny_bert_config(vocab_size=len(tok))).save_pretrained(root / f"bert{i}")
        tok.save_pretrained(root / f"bert{i}")
        encoder = models.Transformer(str(root / f"bert{i}"))
        st = SentenceTransformer(modules=[encoder, models.Pooling(encoder.get_word_embedding_dimension()),
                                          models.Normalize()])
        st.save(str(root / f"st{i}"))
        (root / f"st{i}" / "custom_code.py").write_text("raise SystemExit('never copied, never run')\n")
        paths.append(root / f"st{i}")
    return paths


def test_a_sentence_transformers_model_stays_one(sentence_transformers_models, tmp_path):
    from sentence_transformers import SentenceTransformer

    a, b = sentence_transformers_models
    out = merge([a, b], tmp_path / "merged", optimizer="sgd", progress=False).path
    for side in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
                 "1_Pooling/config.json", "2_Normalize/config.json", "tokenizer.json"):
        assert (out / side).is_file(), side
    assert not (out / "custom_code.py").exists()
    model = SentenceTransformer(str(out), device="cpu")
    embedding = model.encode(["the red cat sits"])
    assert embedding.shape == (1, 16)
    assert np.isclose(np.linalg.norm(embedding), 1.0, atol=1e-5)  # the Normalize module is there
    names = [type(m).__name__ for m in model]
    assert names == ["Transformer", "Pooling", "Normalize"], names


def test_side_files_of_other_kinds_are_copied_and_code_and_weights_are_not(tmp_path):
    from factories import make_finetunes

    a, b = make_finetunes(tmp_path / "ft", n=2)
    for name, text in {"normalizer.json": "{}", "source.spm": "spm", "chat_template.jinja": "{{ x }}",
                       "video_preprocessor_config.json": "{}", "extra/notes.md": "keep", "modeling.py": "x = 1",
                       "training_args.bin": "pickle", "optimizer.pt": "x"}.items():
        (a / name).parent.mkdir(exist_ok=True)
        (a / name).write_text(text)
    out = merge([a, b], tmp_path / "out", optimizer="sgd", progress=False).path
    for kept in ("normalizer.json", "source.spm", "chat_template.jinja", "video_preprocessor_config.json",
                 "extra/notes.md"):
        assert (out / kept).read_text() == (a / kept).read_text(), kept
    for dropped in ("modeling.py", "training_args.bin", "optimizer.pt"):
        assert not (out / dropped).exists(), dropped
