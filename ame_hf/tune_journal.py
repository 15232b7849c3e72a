"""Resumable `tune`: every score is recorded as it is computed (one fsync'd line in the tune's staging folder), and
`resume=True` takes up the staging folder of a tune that stopped, so that no finished candidate is scored again.

The journal is `.ame-tune-journal/` in the staging folder: `key.json` (what the run must share with the one it
continues: ame-hf's version, the resolved ingredients and their local files, the data, the options) and
`scores.jsonl`, one line per score (`{"key", "score", "each"?, "sha256"}`: a validation score keeps its
per-example scores, or the line saying why an lm-eval metric has none, which `guard`'s rule and the card need; the
sha256 covers the rest, so a torn or altered line is ignored and that score computed again). A score read back is the
float that was written (JSON keeps a float's every bit), so a resumed tune ranks, selects and writes what an
uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from . import journal
from .config import AmeConfig
from .lm_harness import LmEvalTasks

logger = logging.getLogger(__name__)

TUNE_JOURNAL = ".ame-tune-journal"
_KEY = f"{TUNE_JOURNAL}/{journal.KEY_FILE}"
_SCORES = "scores.jsonl"
# What a taken-up staging folder keeps: the journal, and the unfinished merge of the pick (`merge`'s own resume).
SELECTED = "selected"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:32]


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in pieces (a task's data file may be large)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def data_digest(data: Any) -> str:
    """What identifies validation or test data: its content (texts, inputs and labels), or for lm-eval tasks their
    settings and the files of their include folder.

    Args:
        data: `LabelledData`, `TextData`, `LmEvalTasks` or None.

    Returns:
        A hex digest.
    """
    if isinstance(data, LmEvalTasks):
        folder = Path(data.include) if data.include else None
        files = [(str(p), _file_digest(p)) for p in sorted(folder.rglob("*")) if p.is_file()
                 ] if folder is not None and folder.is_dir() else []
        return _digest([dataclasses.asdict(data), files])
    if data is None:
        return "none"
    return _digest(dataclasses.asdict(data))


def tune_key(sel: Any, configs: Sequence[AmeConfig], output: AmeConfig, **options: Any) -> dict:
    """What a resumed `tune` must share with the tune it continues.

    Args:
        sel: the run's `Selection` (resolved ingredients, task, metric, data).
        configs: the candidates' configs, in order.
        output: the output options.
        options: every other option that changes a score or the output (device, max_length, batch_size, ...).

    Returns:
        A JSON-able mapping (`journal.take_up` names each part that differs).
    """
    ingredients = [m.ingredient for m in sel.models]
    bases = [m.base for m in sel.models if m.base is not None]
    local = journal.run_key(AmeConfig.soup(), ingredients, None, bases)["local_files"]
    return {"ame_hf": __version__,
            "ingredients": _digest([sel.refs, [b.pinned_ref if b.repo_id else str(b.path) for b in bases], local]),
            "data": _digest([sel.task, sel.metric, data_digest(sel.val), data_digest(sel.test)]),
            "options": _digest([[c.to_dict() for c in configs], output.to_dict(), options])}


def take_up(out: Path, key: dict) -> Path | None:
    """The staging folder of an unfinished `tune` of `out` with the same `key`, made this process's and cleared of
    everything but its journal and the unfinished merge of its pick; None when there is none.

    Args:
        out: the output folder.
        key: this run's `tune_key`.

    Returns:
        The staging folder, or None.

    Raises:
        OutputError: an unfinished tune of `out` was started with another command (one line, before any work).
    """
    staging = journal.take_up(out, key, marker=_KEY, kind="tune")
    if staging is not None:
        for path in staging.iterdir():
            if path.name == SELECTED:  # the pick's folder may hold a card being written: the merge's staging stays
                for inner in path.iterdir():
                    if not inner.name.startswith("."):
                        shutil.rmtree(inner, ignore_errors=True)
            elif path.name != TUNE_JOURNAL:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
    return staging


class ScoreJournal:
    """The scores of one tune, recorded as each is computed; `journal(key, compute)` gives a recorded score
    without computing it again.

    Args:
        staging: the tune's staging folder.
        key: the run's `tune_key` (written once, atomically).
    """

    def __init__(self, staging: Path, key: dict) -> None:
        folder = staging / TUNE_JOURNAL
        folder.mkdir(exist_ok=True)
        if not (folder / journal.KEY_FILE).is_file():
            (folder / "key.tmp").write_text(json.dumps(key, sort_keys=True), encoding="utf-8")
            os.replace(folder / "key.tmp", folder / journal.KEY_FILE)
        self.path = folder / _SCORES
        self.recorded, self.each = _read(self.path)
        self.reused = 0
        if self.recorded:
            logger.info("resuming: %d score(s) recorded by the tune that stopped", len(self.recorded))

    def __call__(self, key: str, compute: Callable[[], float],
                 each: Callable[[], tuple[bool, Any]] | None = None) -> float:
        """The score recorded under `key`, or `compute()` recorded now (durably, before it is used).

        Args:
            key: which model on which data (e.g. `val candidate 3`).
            compute: scores it.
            each: after `compute`, `(True, per-example scores)` to record with the score (`evaluation.PerExample`,
                None, or the line saying why an lm-eval metric gives none), or `(False, None)`.

        Returns:
            The score.
        """
        if key in self.recorded:
            self.reused += 1
            return self.recorded[key]
        value = float(compute())
        entry: dict[str, Any] = {"key": key, "score": value}
        has, per_example = each() if each is not None else (False, None)
        if has:
            entry["each"] = per_example if per_example is None or isinstance(per_example, str) else [
                [float(x) for x in part] for part in per_example]  # a line: why an lm-eval metric gives none
            self.each[key] = entry["each"]
        line = json.dumps({**entry, "sha256": _digest(entry)}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.recorded[key] = value
        return value

    def was_recorded(self, key: str) -> bool:
        """Whether `key`'s score is recorded (it will not be computed again)."""
        return key in self.recorded


def _read(path: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """key -> score, and key -> per-example scores where recorded, from the lines that verify (a torn or altered
    line is skipped)."""
    scores: dict[str, float] = {}
    each: dict[str, Any] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return scores, each
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            body = {k: entry[k] for k in ("key", "score", "each") if k in entry}
            if isinstance(body["key"], str) and isinstance(body["score"], float) and entry["sha256"] == _digest(body):
                scores[body["key"]] = body["score"]
                if "each" in body:
                    got = body["each"]
                    each[body["key"]] = got if got is None or isinstance(got, str) else tuple(got)
        except (ValueError, KeyError, TypeError):
            continue
    return scores, each
