"""What may be copied from a model folder into an output (ame_hf/finish.py `may_copy`): one rule for a merge's
side files and for the copy of a selected ingredient (`tune`, the greedy soup): never code, never a training
run's state, never hidden files; weights only in the copy of a model, never beside weights ame-hf wrote."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import ame_hf.selection as selection
import ame_hf.tuning as tuning
from ame_hf import merge
from ame_hf.finish import TRAINING_STATE_PATTERNS, may_copy
from factories import load_state

# Never in any output.
FORBIDDEN = ["x.so", "y.pyc", "lib.dylib", "native.dll", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt",
             "rng_state.pth", "rng_state_3.pth", "training_args.bin", "trainer_state.json", "modeling.py",
             "__pycache__/modeling.cpython-311.pyc", "checkpoint-500/config.json", "checkpoint-500/optimizer.pt",
             ".cache/huggingface/download/model.safetensors.metadata", ".hidden.json", "1_Pooling/helper.py"]
# Side files every output keeps.
SIDE_FILES = {"1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}\n',
              "generation_config.json": '{"max_new_tokens": 7}\n', "extra/notes.md": "kept\n"}


@pytest.fixture
def cluttered(berts, tmp_path) -> tuple[Path, Path, Path]:
    """Copies of the two tiny BERTs; the first holds what a training run and a checkout leave in a model folder
    beside its side files. Returns (cluttered, plain, validation file)."""
    experts, val = berts
    a, b = (Path(shutil.copytree(e, tmp_path / "models" / e.name)) for e in experts)
    for name in FORBIDDEN:
        (a / name).parent.mkdir(parents=True, exist_ok=True)
        (a / name).write_text("never copied\n")
    for name, text in SIDE_FILES.items():
        (a / name).parent.mkdir(parents=True, exist_ok=True)
        (a / name).write_text(text)
    return a, b, val


def _assert_clean(out: Path) -> None:
    for name, text in SIDE_FILES.items():
        assert (out / name).read_text() == text, name
    for name in FORBIDDEN:
        assert not (out / name).exists(), name
    leftovers = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                       if p.suffix in (".py", ".pyc", ".so", ".pt", ".pth") or p.name.startswith((".", "checkpoint-")))
    assert leftovers == [], leftovers


def test_merge_tune_and_greedy_soup_copy_the_same_files(cluttered, tmp_path, monkeypatch):
    a, b, val = cluttered
    merged = merge([a, b], tmp_path / "merged", optimizer="sgd", progress=False).path
    _assert_clean(merged)

    # The cluttered ingredient scores best and every merge worse: tune and the greedy soup copy it.
    def score(model, data, task, metric=None, **kwargs) -> float:
        # (tune scores its merges as models built in memory, the ingredients by folder)
        return 0.99 if isinstance(model, (str, Path)) and Path(model) == a else 0.5

    monkeypatch.setattr(tuning, "evaluate_model", score)
    monkeypatch.setattr(selection, "evaluate_model", score)
    tuned = tuning.tune([a, b], tmp_path / "tuned", data=val, budget=1, progress=False)
    greedy = selection.greedy_soup([a, b], tmp_path / "greedy", data=val)
    assert tuned.best.ingredient == 0 and greedy.kept == [0]
    expected = load_state(a)
    for out in (tuned.path, greedy.path):
        _assert_clean(out)
        written = load_state(out)  # the copy keeps the ingredient's own weights, unchanged
        assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
        assert (out / "config.json").read_bytes() == (a / "config.json").read_bytes()
        assert "selected_by: tune" in (out / "ame_config.yaml").read_text()


def test_the_training_state_names_are_transformers_own():
    """The filter spells the Trainer's file names out (importing transformers.trainer takes seconds): they must
    stay the names the Trainer writes."""
    import fnmatch

    from transformers import trainer, trainer_utils

    names = [trainer.TRAINER_STATE_NAME, trainer.TRAINING_ARGS_NAME, trainer.OPTIMIZER_NAME, trainer.OPTIMIZER_NAME_BIN,
             trainer.SCHEDULER_NAME, trainer.SCALER_NAME, "rng_state.pth", "rng_state_0.pth"]
    assert all(any(fnmatch.fnmatch(n, p) for p in TRAINING_STATE_PATTERNS) for n in names), names
    assert not may_copy(f"{trainer_utils.PREFIX_CHECKPOINT_DIR}-12/config.json", weights=True)


@pytest.mark.parametrize("name, beside_our_weights, in_a_copy", [
    ("model.safetensors", False, True), ("model-00001-of-00002.safetensors", False, True),
    ("model.safetensors.index.json", False, True), ("pytorch_model.bin", False, True),
    ("2_Dense/model.safetensors", False, True), ("tokenizer.json", True, True), ("modules.json", True, True),
    ("optimizer.pt", False, False), ("trainer_state.json", False, False), ("modeling_custom.py", False, False),
    (".gitattributes", False, False), ("sub/.hidden", False, False), ("checkpoint-10/tokenizer.json", False, False),
])
def test_may_copy(name, beside_our_weights, in_a_copy):
    assert may_copy(name) is beside_our_weights
    assert may_copy(name, weights=True) is in_a_copy
