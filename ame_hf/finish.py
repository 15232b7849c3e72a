"""The finish step of a merge: beside the weights, the source model's config and every side file and
folder (never weights or code), the tokenizer, chat template and processor files of the tokenizer
source, `ame_config.yaml` and the model card, all written into the staging directory."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
from pathlib import Path, PurePath
from typing import Callable, Sequence

from ._differences import updated
from ._model_files import CODE_PATTERNS, WEIGHT_PATTERNS
from ._text_config import with_vocab_size
from .card import render_card
from .checkpoint import Checkpoint
from .config import QUANTIZED_OUTPUT_DTYPES
from .errors import CheckpointError
from .output import RUN_FILE
from .recipe import write_run_file
from .records import MergeResult
from .requantize import quantized_layout
from .vocabulary import VocabularyPlan, is_tokenizer_file

logger = logging.getLogger(__name__)

# Written by ame-hf itself, or bookkeeping of a tool: never copied from a source model.
OWN_FILES = {"config.json", "README.md", RUN_FILE}
_WEIGHT_INDEXES = ("model.safetensors.index", "pytorch_model.bin.index")
# What resumes a training run and is no part of a model: the names of transformers.trainer's TRAINER_STATE_NAME,
# TRAINING_ARGS_NAME, OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME, SCALER_NAME and its rng states
# (pinned by a test: importing transformers.trainer takes seconds), and its `checkpoint-<step>` folders
# (transformers.trainer_utils.PREFIX_CHECKPOINT_DIR).
TRAINING_STATE_PATTERNS = ("trainer_state.json", "training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt",
                           "scaler.pt", "rng_state*.pth")
_TRAINER_CHECKPOINT = re.compile(r"checkpoint-\d+")


def finish(staging: Path, result: MergeResult, checkpoints: list[Checkpoint], *, source: Checkpoint,
           tokenizer_dir: Path | None, vocab: VocabularyPlan | None = None) -> None:
    """Write everything but the weights.

    Args:
        staging: the staging directory of the output.
        result: the merge's record (config, ingredients, order, pivot).
        checkpoints: the ingredients (for the card).
        source: the checkpoint whose config and side files the output takes.
        tokenizer_dir: where the tokenizer, chat template and processor files come from.
        vocab: when vocabularies differ, the plan the token-indexed rows were merged with: the config's
            `vocab_size` follows it, and a union's new tokens are added to the saved tokenizer.
    """
    # What the check changed: an untied head, the labels of the merged classifier rows.
    config = updated(source.config, result.report.config_updates if result.report is not None else {})
    if config.pop("auto_map", None) is not None:
        logger.warning("%s: config.json has auto_map (remote code); it is not copied and never run", source.name)
    config.pop("_name_or_path", None)
    config.pop("quantization_config", None)  # FP8 / MXFP4 ingredients: the merge is written dequantized
    if result.config.dtype in QUANTIZED_OUTPUT_DTYPES:  # ... unless asked for back: their layout, the rest in their dtype
        config["quantization_config"] = quantized_layout(result.config.dtype, checkpoints)[0]
    elif result.config.dtype != "auto":
        config["dtype"] = result.config.dtype
    if vocab is not None:
        config = with_vocab_size(config, vocab.size)
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copy_side_files(source.path, staging, skip_tokenizer=tokenizer_dir is not None)
    if tokenizer_dir is not None:
        for file in sorted(tokenizer_dir.iterdir()):
            if file.is_file() and is_tokenizer_file(file.name):
                shutil.copyfile(file, staging / file.name)
    if vocab is not None and vocab.new_tokens:
        save_union_tokenizer(tokenizer_dir or source.path, staging, vocab)
    write_run_file(staging / RUN_FILE, result)
    render_card(result, checkpoints).save(staging / "README.md")


def save_union_tokenizer(source: Path, staging: Path, vocab: VocabularyPlan) -> None:
    """The source tokenizer with the union's new tokens added (special ones as special), saved over the
    copied files; every token must then encode to the id of its row.

    Raises:
        CheckpointError: the tokenizer does not give the new tokens the ids of their rows.
    """
    from transformers import AddedToken, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)  # a tokenizer is data: no repo code is run
    first = len(tokenizer)
    tokenizer.add_tokens([AddedToken(t, special=special, normalized=not special) for t, special in vocab.new_tokens])
    start = vocab.size - len(vocab.new_tokens) if vocab.first_new is None else vocab.first_new
    expected = list(range(start, start + len(vocab.new_tokens)))
    got = tokenizer.convert_tokens_to_ids([t for t, _ in vocab.new_tokens])
    if got != expected:
        raise CheckpointError(f"the tokenizer of {source} gives the new tokens ids {got[:3]}..., not their rows "
                              f"{expected[:3]}... ({first} tokens before them); choose another tokenizer_source",
                              field="tokenizer_source")
    tokenizer.save_pretrained(staging)


def may_copy(path: str | PurePath, *, weights: bool = False) -> bool:
    """Whether a file of a model folder may go into an output. Never code (`*.py`, `*.pyc`, `*.so`, ...),
    never a training run's state (optimizer, scheduler, rng, trainer state and arguments, `checkpoint-N/`),
    never hidden files or folders; weight files (and their indexes) only when the output keeps this model's
    weights, never beside weights ame-hf wrote.

    The one rule for every output: a merge's side files (`copy_side_files`) and a selected ingredient's copy.

    Args:
        path: the file, relative to the model folder (`1_Pooling/config.json`).
        weights: the output is a copy of this model, weights included.

    Returns:
        True when the file may be copied.

    >>> may_copy("1_Pooling/config.json"), may_copy("model.safetensors"), may_copy("model.safetensors", weights=True)
    (True, False, True)
    >>> may_copy("modeling_x.py"), may_copy("optimizer.pt", weights=True), may_copy("checkpoint-500/config.json")
    (False, False, False)
    """
    *folders, name = PurePath(path).parts
    if not all(_may_copy_folder(f) for f in folders) or name.startswith("."):
        return False
    if _matches(name, CODE_PATTERNS) or _matches(name, TRAINING_STATE_PATTERNS):
        return False
    if _matches(name, WEIGHT_PATTERNS) or name.startswith(_WEIGHT_INDEXES):
        return weights
    return True


def _may_copy_folder(name: str) -> bool:
    return not (name.startswith(".") or name == "__pycache__" or _TRAINER_CHECKPOINT.fullmatch(name))


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def copy_model_files(source: Path, target: Path, *, weights: bool = False,
                     skip: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Copy every file of the model folder `source` that `may_copy` allows into `target` (created), keeping
    sub-folders (a sentence-transformers model keeps `modules.json`, `1_Pooling/`, ...).

    Args:
        source: the model folder (a Hub snapshot's links are followed: the files are copied).
        target: the output folder.
        weights: copy the weights too (the output is a copy of this model).
        skip: top-level file names the output writes itself.

    Returns:
        The copied files, relative to `target`, in POSIX form.
    """
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for root, dirs, files in os.walk(source):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if _may_copy_folder(d))
        for name in sorted(files):
            rel = (here / name).relative_to(source)
            if not may_copy(rel, weights=weights) or (len(rel.parts) == 1 and skip(name)):
                continue
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(here / name, target / rel)
            copied.append(rel.as_posix())
    return copied


def copy_side_files(source: Path, target: Path, *, skip_tokenizer: bool = False) -> list[str]:
    """Copy every file and folder of a model directory that `may_copy` allows beside weights ame-hf writes:
    neither weights nor code nor training state, and none of the files the merge writes itself.

    Args:
        source: the model folder whose side files the output takes.
        target: the output (staging) folder.
        skip_tokenizer: leave the top-level tokenizer files out (they come from the tokenizer source).

    Returns:
        The copied files, relative to `target`, in POSIX form.
    """
    return copy_model_files(source, target, skip=lambda name: name in OWN_FILES or (
        skip_tokenizer and is_tokenizer_file(name)))
