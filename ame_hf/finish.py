"""The finish step of a merge: beside the weights, the config, tokenizer, processor and generation
files of the source model, `ame_config.yaml` and the model card, all written into the staging directory."""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from pathlib import Path

from .card import render_card
from .checkpoint import Checkpoint
from .recipe import write_run_file
from .records import MergeResult
from .resolve import SIDE_PATTERNS

logger = logging.getLogger(__name__)


def finish(staging: Path, result: MergeResult, checkpoints: list[Checkpoint], pivot: Checkpoint | None,
           command: str | None) -> None:
    """Config, tokenizer and generation files from the pivot (or first ingredient), ame_config.yaml, card."""
    source = pivot or checkpoints[result.pivot if isinstance(result.pivot, int) else 0]
    config = dict(source.config)
    if config.pop("auto_map", None) is not None:
        logger.warning("%s: config.json has auto_map (remote code); it is not copied and never run", source.name)
    config.pop("_name_or_path", None)
    if result.config.dtype != "auto":
        config["dtype"] = result.config.dtype
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for file in sorted(source.path.iterdir()):
        if file.name == "config.json" or not file.is_file() or file.suffix in (".py", ".bin", ".safetensors"):
            continue
        if any(fnmatch.fnmatch(file.name, p) for p in SIDE_PATTERNS):
            shutil.copyfile(file, staging / file.name)
    write_run_file(staging / "ame_config.yaml", result)
    render_card(result, checkpoints, command=command).save(staging / "README.md")
