"""The finish step of a merge: beside the weights, the source model's config and every side file and
folder (never weights or code), the tokenizer, chat template and processor files of the tokenizer
source, `ame_config.yaml` and the model card, all written into the staging directory."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ._differences import updated
from .card import render_card
from .checkpoint import Checkpoint
from .errors import CheckpointError
from .fetch import is_light
from .output import RUN_FILE, STAGING_PREFIX
from .recipe import write_run_file
from .records import MergeResult
from .vocabulary import VocabularyPlan, is_tokenizer_file

logger = logging.getLogger(__name__)

# Written by ame-hf itself, or bookkeeping of a tool: never copied from a source model.
OWN_FILES = {"config.json", "README.md", RUN_FILE}
_WEIGHT_INDEXES = ("model.safetensors.index", "pytorch_model.bin.index")


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
    if result.config.dtype != "auto":
        config["dtype"] = result.config.dtype
    if vocab is not None:
        config["vocab_size"] = vocab.size
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
    expected = list(range(vocab.size - len(vocab.new_tokens), vocab.size))
    got = tokenizer.convert_tokens_to_ids([t for t, _ in vocab.new_tokens])
    if got != expected:
        raise CheckpointError(f"the tokenizer of {source} gives the new tokens ids {got[:3]}..., not their rows "
                              f"{expected[:3]}... ({first} tokens before them); choose another --tokenizer-source")
    tokenizer.save_pretrained(staging)


def copy_side_files(source: Path, target: Path, *, skip_tokenizer: bool = False) -> list[str]:
    """Copy every file and folder of a model directory that is neither weights nor code (so a
    sentence-transformers model keeps `modules.json`, `1_Pooling/`, ...). Returns what was copied."""
    copied = []
    for root, dirs, files in os.walk(source):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", STAGING_PREFIX)) and d != "__pycache__")
        for name in sorted(files):
            rel = (here / name).relative_to(source)
            top = len(rel.parts) == 1
            if (name.startswith(".") or not is_light(name) or (top and name in OWN_FILES)
                    or (top and name.startswith(_WEIGHT_INDEXES)) or (top and skip_tokenizer and is_tokenizer_file(name))):
                continue
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(here / name, target / rel)
            copied.append(rel.as_posix())
    return copied
