"""Resumable merges: the journal a merge keeps in its staging directory, and how `resume=True` takes up the
staging directory of a merge that stopped (kill -9, power loss, a full disk) and keeps what it finished.

The plan fixes every output tensor's byte range before any is computed, and every tensor is one independent
unit of work. As each tensor is written, the process that wrote it appends its sha256 (read back from the
shard file) to its own journal file (`.ame-journal/done-<host>-<pid>.jsonl`: one writer per file, so processes
on several machines sharing the output's folder never write the same file). Nothing is synced: a resumed merge
hashes every recorded tensor again and redoes those whose bytes differ (or whose shard's header or size does),
so a record that outlived the bytes it describes (power loss) costs only the redo. The journal goes before the
output is published; the published bytes are those of a merge that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import OutputError
from ._weight_files import SAFE_INDEX, SAFE_SINGLE
from .output import RUN_FILE, STAGING_PREFIX, _owned, _pid_alive
from .plan import ShardPlan
from .recipe import recipe_digest
from .records import Ingredient
from .writer import create_shard_files

logger = logging.getLogger(__name__)

JOURNAL_DIR = ".ame-journal"
KEY_FILE = "key.json"
_CHUNK = 2**20  # read back in small pieces into one buffer: little memory in the writer thread
# How the refusal of another merge's resume names each part of the key that differs.
_KEY_WORDS = {"ame_hf": "another ame-hf version", "recipe": "another recipe (options or resolved ingredient revisions)",
              "local_files": "other files in a local input folder", "ingredients": "other ingredients or revisions",
              "data": "other data", "options": "other options"}


def run_key(config: Any, ingredients: Sequence[Ingredient], pivot: Any, others: Sequence[Ingredient] = ()) -> dict:
    """What a resumed merge must share with the merge it continues: ame-hf's version, the recipe (config and
    resolved ingredients: a Hub one pinned to its commit) and, for local folders (which have no commit), the
    name, size and modification time of each of their files.

    Args:
        config: the resolved `AmeConfig`.
        ingredients: the resolved ingredients.
        pivot: the pivot, as `recipe_digest` takes it.
        others: the other inputs (pivot, base, tokenizer source) whose local files count too.

    Returns:
        A JSON-able mapping.
    """
    files = hashlib.sha256()
    for ingredient in [*ingredients, *others]:
        if ingredient.repo_id:
            continue
        folder = Path(ingredient.path)
        for path in sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []:
            stat = path.stat()
            files.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"ame_hf": __version__, "recipe": recipe_digest(config, ingredients, pivot),
            "local_files": files.hexdigest()[:16]}


def _candidates(out: Path, marker: str = f"{JOURNAL_DIR}/{KEY_FILE}") -> list[Path]:
    """Staging folders of `out` with a journal (`marker`: its key file), left by processes that are gone or by an
    earlier call in this one (a Python caller trying again); newest first."""
    pattern = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-" + re.escape(out.name) + r"-([a-z0-9_]+)")
    found = []
    for path in out.parent.glob(f"{STAGING_PREFIX}*"):
        match = pattern.fullmatch(path.name)
        if (match and path.is_dir() and not path.is_symlink() and _owned(path)
                and (int(match[1]) == os.getpid() or not _pid_alive(int(match[1])))
                and (path / marker).is_file()):
            found.append(path)
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def _read_key(path: Path, marker: str = f"{JOURNAL_DIR}/{KEY_FILE}") -> dict | None:
    try:
        return json.loads((path / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def take_up(out: str | os.PathLike, key: dict, *, marker: str = f"{JOURNAL_DIR}/{KEY_FILE}",
            kind: str = "merge") -> Path | None:
    """The staging folder of an unfinished merge of `out` with the same `key`, renamed as this process's
    (so that no other run removes it as stale); None when there is none.

    Args:
        out: the output directory.
        key: this merge's `run_key`.
        marker: the key file that marks such a staging folder (a `tune`'s is its own).
        kind: what the run is, as the refusal names it.

    Returns:
        The staging folder taken up, or None (the merge starts from the beginning).

    Raises:
        OutputError: an unfinished merge of `out` exists but was started with another config or other inputs.
    """
    out = Path(out).absolute()
    candidates = _candidates(out, marker)
    for path in candidates:
        if _read_key(path, marker) != key:
            continue
        suffix = path.name.rsplit("-", 1)[1]
        mine = out.parent / f"{STAGING_PREFIX}{os.getpid()}-{out.name}-{suffix}"
        try:
            os.rename(path, mine)
        except OSError:
            continue  # another run took it up first
        logger.info("resuming the unfinished %s in %s", kind, mine)
        return mine
    if candidates:
        theirs = _read_key(candidates[0], marker) or {}
        what = " and ".join(_KEY_WORDS.get(k, k) for k in key if theirs.get(k) != key[k])
        raise OutputError(f"resume=True: the unfinished {kind} of out_dir {os.fspath(out)!r} in {candidates[0].name} "
                          f"was started with {what}; run it again exactly as then, or without resume=True to start "
                          "over (which removes it)", path=out, fields=("resume", "out_dir"))
    logger.info("nothing to resume for %s: starting from the beginning", out)
    return None


def prepare(staging: Path, plan: ShardPlan, key: dict) -> set[str]:
    """Make the shard files and the journal in `staging`; in one taken up, keep what is finished.

    A shard file is kept when its size and header are the plan's (else it is made again, all its tensors to
    redo), and a recorded tensor counts as done when its bytes still hash to what was recorded.

    Args:
        staging: the staging folder (new, or from `take_up`).
        plan: the output's `ShardPlan`.
        key: this merge's `run_key`.

    Returns:
        The tensors already written, verified.

    Raises:
        OSError: a file cannot be written.
    """
    journal = staging / JOURNAL_DIR
    recorded = _recorded(journal)
    kept = [s for s in plan.shards if recorded and _intact(staging / s.name, s)]
    create_shard_files(staging, plan, [s for s in plan.shards if s not in kept])
    names = {t for s in kept for t in s.entries}
    done = {t for t, digest in recorded.items() if t in names and tensor_sha256(staging, plan, t) == digest}
    if recorded:
        logger.info("resuming: %d of %d tensor(s) already written and verified; %d recorded ones redone",
                    len(done), len(plan.location), len(set(recorded) - done))
    if not (journal / KEY_FILE).is_file():
        journal.mkdir(exist_ok=True)
        (journal / f"{KEY_FILE}.tmp").write_text(json.dumps(key, sort_keys=True), encoding="utf-8")
        os.replace(journal / f"{KEY_FILE}.tmp", journal / KEY_FILE)
    return done


def _recorded(journal: Path) -> dict[str, str]:
    """tensor -> sha256 from every journal file (a torn last line, from a power loss, is skipped)."""
    recorded: dict[str, str] = {}
    for path in sorted(journal.glob("done-*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                recorded[entry["tensor"]] = entry["sha256"]
            except (ValueError, KeyError, TypeError):
                continue
    return recorded


def _intact(path: Path, shard: Any) -> bool:
    head = 8 + len(shard.header)
    try:
        if path.stat().st_size != head + shard.data_size:
            return False
        with open(path, "rb") as f:
            return f.read(head) == len(shard.header).to_bytes(8, "little") + shard.header
    except OSError:
        return False


def tensor_sha256(directory: Path, plan: ShardPlan, name: str) -> str:
    """sha256 of tensor `name`'s bytes in its shard file.

    Args:
        directory: the staging folder.
        plan: the output's `ShardPlan`.
        name: the tensor.

    Returns:
        The hex digest.
    """
    shard = plan.location[name]
    digest = hashlib.sha256()
    offset, stop = shard.offset(name), shard.offset(name) + plan.nbytes(name)
    buffer = bytearray(min(_CHUNK, stop - offset))  # one buffer, read into again and again
    view = memoryview(buffer)
    fd = os.open(directory / shard.name, os.O_RDONLY)
    try:
        while offset < stop:
            got = os.preadv(fd, [view[:min(len(buffer), stop - offset)]], offset)
            if not got:
                break
            digest.update(view[:got])
            offset += got
    finally:
        os.close(fd)
    return digest.hexdigest()


class Journal:
    """This process's journal file: `record(name)` once tensor `name` is written.

    Args:
        staging: the staging folder (`prepare` made the journal folder).
        plan: the output's `ShardPlan`.
    """

    def __init__(self, staging: Path, plan: ShardPlan) -> None:
        self.staging, self.plan = staging, plan
        self.path = staging / JOURNAL_DIR / f"done-{socket.gethostname()}-{os.getpid()}.jsonl"

    def record(self, name: str, sha256: str | None = None) -> None:
        """Append tensor `name`'s sha256 (one `write`, so a line is whole or torn, never mixed with another's).

        Args:
            name: a tensor whose writes have all completed.
            sha256: the digest of the bytes as they were written (`writer.WrittenDigests`); None: read them back
                from the shard.

        Raises:
            OSError: the journal cannot be written.
        """
        digest = sha256 if sha256 is not None else tensor_sha256(self.staging, self.plan, name)
        line = json.dumps({"tensor": name, "sha256": digest}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)


def finished(out: str | os.PathLike, stamp: dict[str, str]) -> bool:
    """`out` already holds this merge, published (a job submitted again after it finished): its first shard's
    header carries the same stamp (ame-hf version, optimizer, ingredient count, recipe digest).

    Args:
        out: the output directory.
        stamp: this merge's shard stamp.

    Returns:
        True when there is nothing left to do.
    """
    out = Path(out)
    index = out / SAFE_INDEX
    try:
        first = (sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))[0]
                 if index.is_file() else SAFE_SINGLE)
        if "/" in first or not (out / RUN_FILE).is_file():
            return False
        with open(out / first, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        return all(header.get("__metadata__", {}).get(k) == v for k, v in stamp.items())
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return False


def close(staging: Path) -> None:
    """Remove the journal before the output is published (it is no part of the model).

    Args:
        staging: the finished staging folder.
    """
    shutil.rmtree(staging / JOURNAL_DIR, ignore_errors=True)
