"""The output directory: which `out_dir` may be written or replaced, the staging directory beside it,
and the atomic move into place. Imports neither torch nor huggingface_hub (errors must be instant).

A user's files are never deleted or altered unless they asked ame-hf to write them: `overwrite=True`
replaces only an empty directory or a previous ame-hf output, and never one that is, contains or lies
inside an input of the merge, the current directory, a parent of it, the home directory or `/`.
"""

from __future__ import annotations

import atexit
import errno
import glob
import logging
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import OutputError

logger = logging.getLogger(__name__)

# Every merge output holds this file; it is what marks a directory as one ame-hf may replace.
RUN_FILE = "ame_config.yaml"
STAGING_PREFIX = ".ame-tmp-"


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _related(a: Path, b: Path) -> bool:
    """True when one path is the other or lies inside it."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_output_dir(out: str | os.PathLike, overwrite: bool, *, inputs: Iterable[str | os.PathLike] = (),
                     resume: bool = False) -> None:
    """Refuse an `out_dir` that would destroy or alter files the user did not ask ame-hf to write.

    Checked before any work, and again before the output is moved into place.

    Args:
        out: the output directory.
        overwrite: the user asked to replace an existing output.
        inputs: local directories the run reads (ingredients, pivot, tokenizer source): `out` may be
            none of them, and may neither contain nor lie inside one.
        resume: a previous ame-hf output passes for now: the merge then finds whether it is this merge, finished
            (`journal.finished`), and checks again without `resume` if not.

    Raises:
        OutputError: one line saying why and what to pass instead (naming `out_dir` and `overwrite`, which the
            CLI shows as `--out` and `--overwrite`).

    >>> check_output_dir("/", overwrite=False)
    Traceback (most recent call last):
    ...
    ame_hf.errors.OutputError: out_dir '/' is the filesystem root; give a new or empty directory, e.g. out_dir='merged'
    """
    out = Path(out)
    real = _real(out)
    cwd = _real(os.getcwd())
    home = _real(Path.home())
    if real == Path(real.anchor) or real == home or cwd.is_relative_to(real):
        what = ("the filesystem root" if real == Path(real.anchor) else "your home directory" if real == home
                else "the current directory" if real == cwd else "a parent of the current directory")
        raise OutputError(f"out_dir {_quoted(out)} is {what}; give a new or empty directory, e.g. out_dir='merged'",
                          path=out, field="out_dir")
    for source in inputs:
        if _related(real, _real(source)):
            where = ("is" if real == _real(source) else
                     "lies inside" if real.is_relative_to(_real(source)) else "contains")
            raise OutputError(f"out_dir {_quoted(out)} {where} the input {source}; ame-hf never writes over its "
                              "inputs: choose another out_dir", path=out, field="out_dir")
    if out.exists() and not out.is_dir():
        raise OutputError(f"out_dir {_quoted(out)} exists and is not a directory; choose another path", path=out,
                          field="out_dir")
    if out.is_dir() and any(out.iterdir()):
        if not (out / RUN_FILE).is_file():
            raise OutputError(f"out_dir {_quoted(out)} is not empty and is not an ame-hf output (no {RUN_FILE}); "
                              "ame-hf replaces only its own outputs: choose a new or empty directory", path=out,
                              field="out_dir")
        if not overwrite and not resume:
            raise OutputError(f"out_dir {_quoted(out)} holds a previous ame-hf output; pass overwrite=True to "
                              "replace it, or choose another path", path=out, fields=("out_dir", "overwrite"))
    parent = out.absolute().parent
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create the parent of out_dir {_quoted(out)}: {err.strerror}", path=out,
                              field="out_dir") from err
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"out_dir {_quoted(out)}: directory {parent} is not writable; choose another path", path=out,
                          field="out_dir")


def _quoted(path: str | os.PathLike) -> str:
    """A path as a message names it: quoted, so that the CLI leaves it as it is (a folder may be named `overwrite`)."""
    return repr(os.fspath(path))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_staging_dir(out: str | os.PathLike) -> Path:
    """A fresh hidden directory beside `out` (same filesystem, so the final rename is atomic), with the
    permissions of a directory the user would create (mkdtemp's are 0700). Staging directories of dead
    processes there are removed first.

    Args:
        out: the output directory.

    Returns:
        The new directory, `.ame-tmp-<pid>-<name>-*`.

    Raises:
        OutputError: the parent of `out` cannot be written.
    """
    out = Path(out).absolute()
    remove_stale_staging(out.parent)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-{out.name}-", dir=out.parent))
        staging.chmod(0o777 & ~_umask())
    except OSError as err:
        raise OutputError(f"cannot write beside out_dir {_quoted(out)}: {err.strerror}", path=out,
                          field="out_dir") from err
    return staging


def remove_stale_staging(parent: Path) -> None:
    """Remove staging directories left in `parent` by ame-hf processes that are gone (SIGKILL, power loss).

    Their names start with `.ame-tmp-<pid>-`; one whose process still runs is left alone.

    Args:
        parent: the folder that holds `out_dir`.
    """
    remove_stale_dirs(parent, STAGING_PREFIX)


def remove_stale_dirs(parent: Path, prefix: str) -> list[Path]:
    """Remove the directories `<prefix><pid>-*` in `parent` whose process is gone: what an ame-hf process that
    was killed left behind. Only directories of this user are touched; a name without a pid, a link, or a
    directory whose process still runs (or may: another user's) stays.

    Args:
        parent: where to look.
        prefix: the start of the names ame-hf gives such directories (e.g. `.ame-tmp-`).

    Returns:
        The directories removed.
    """
    removed = []
    for path in parent.glob(glob.escape(prefix) + "*"):
        pid_text = path.name[len(prefix):].split("-", 1)[0]
        if (pid_text.isdigit() and path.is_dir() and not path.is_symlink() and _owned(path)
                and not _pid_alive(int(pid_text))):
            logger.debug("removing %s, left by process %s, which is gone", path, pid_text)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def process_temp_dir(prefix: str) -> Path:
    """A new folder `<tmp>/<prefix><pid>-*` that this process removes when it exits: normally, by Ctrl-C, or by
    SIGTERM once `clean_up_temp_dirs` ran. One left by a killed process goes at the next `clean_up_temp_dirs`.

    Args:
        prefix: the start of the folder's name, e.g. `ame-hf-space-`.

    Returns:
        The new, empty folder.
    """
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    if not _OWN_TEMP_DIRS:
        atexit.register(_remove_own_temp_dirs)
    _OWN_TEMP_DIRS.add(folder)
    return folder


def clean_up_temp_dirs(prefix: str) -> list[Path]:
    """Remove the `process_temp_dir` folders of `prefix` whose process is gone (a killed process leaves them
    behind, gigabytes with real models), and, from the main thread, have SIGTERM remove this process's own
    before it dies of the signal as before (unless the program set a SIGTERM handler of its own).

    Args:
        prefix: the start of the folders' names.

    Returns:
        The stale folders removed.

    >>> clean_up_temp_dirs("ame-hf-space-")  # doctest: +SKIP
    [PosixPath('/tmp/ame-hf-space-4242-k2j3c9')]
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _remove_own_temp_dirs_and_terminate)
    return remove_stale_dirs(Path(tempfile.gettempdir()), prefix)


def remove_temp_dir(folder: Path) -> None:
    """Remove a `process_temp_dir` folder now, when its job is done (nothing of it is then left for the exit).

    Args:
        folder: from `process_temp_dir`.
    """
    shutil.rmtree(folder, ignore_errors=True)
    _OWN_TEMP_DIRS.discard(folder)


# What `process_temp_dir` made in this process: exactly these are removed at exit.
_OWN_TEMP_DIRS: set[Path] = set()


def _remove_own_temp_dirs() -> None:
    for folder in list(_OWN_TEMP_DIRS):
        shutil.rmtree(folder, ignore_errors=True)


def _remove_own_temp_dirs_and_terminate(signum: int, frame: object) -> None:
    _remove_own_temp_dirs()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _owned(path: Path) -> bool:
    getuid = getattr(os, "getuid", None)  # POSIX; elsewhere a temp folder is the user's own
    return getuid is None or path.lstat().st_uid == getuid()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped: its parent is gone too where nothing reaps) writes nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextmanager
def staging_cleanup(staging: Path, out: str | os.PathLike, *, owner: bool = True,
                    keep: bool = False) -> Iterator[None]:
    """Errors and Ctrl-C alike never leave a half-written model behind: the owner of `staging` removes
    it (or, with `keep`, leaves it for `resume=True`), and an OSError becomes one `OutputError` line about `out`.

    Args:
        staging: the staging directory.
        out: the output directory (for the message).
        owner: this block made `staging` and removes it on failure.
        keep: leave `staging` on failure, for a run with `resume=True` to continue (never at `out`).

    Returns:
        A context manager.

    Raises:
        OutputError: an OSError inside the block.
    """
    try:
        yield
    except BaseException as err:
        if owner and keep:
            logger.warning("the finished part of the merge is kept in %s: run the same command with --resume "
                           "(Python: resume=True) to continue", staging)
        elif owner:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            raise OutputError(describe_os_error(err, Path(out)), path=out, field="out_dir") from err
        raise


def publish(staging: Path, out: str | os.PathLike, overwrite: bool) -> None:
    """Move a complete staging directory to `out`; an existing output is replaced only at the end.

    Args:
        staging: the finished staging directory.
        out: the output directory.
        overwrite: an existing ame-hf output there may be replaced.

    Raises:
        OutputError: `out` was filled by something else meanwhile (nothing is replaced).
        OSError: a rename failed (a replaced output is put back first).
    """
    out = Path(out).absolute()
    old = None
    if out.exists():
        if any(out.iterdir()) and not (overwrite and (out / RUN_FILE).is_file()):
            raise OutputError(f"out_dir {_quoted(out)} was filled by something else during the merge; the merge "
                              "is not published and nothing was replaced", path=out, field="out_dir")
        old = out.parent / f"{STAGING_PREFIX}{os.getpid()}-{out.name}-old"
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def describe_os_error(err: OSError, out: Path) -> str:
    """One line for an OSError met while writing the output.

    Args:
        err: the error.
        out: the output directory.

    Returns:
        The message, saying what to do (free space, a writable `out_dir`): an `OutputError`'s, with
        `field="out_dir"`.

    >>> describe_os_error(OSError(errno.EROFS, "Read-only file system"), Path("merged"))
    'cannot write the output beside merged (Read-only file system); choose a writable out_dir'
    """
    if err.errno in (errno.ENOSPC, errno.EFBIG):
        return f"not enough space to write the output beside {out} ({err.strerror}); free some space or choose another out_dir"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write the output beside {out} ({err.strerror}); choose a writable out_dir"
    return f"writing the output beside {out} failed: {err.strerror or err}"
