"""An lm-eval run without its progress bars and its `git` line (`progress=False`, `--quiet`): lm-eval's, datasets' and
tqdm's own switches where they exist; what has none is held back from stderr and dropped, everything else shown."""

from __future__ import annotations

import functools
import io
import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import Any, Iterator

# What lm-eval prints that no switch turns off: the bar over a task's documents (`Task.build_all_requests`), and
# git's complaint when the working directory is no repository (`git describe` for the results' `git_hash`).
_BAR = re.compile(r"^[^|]*\d+%\|.*\| *[\d.?]+\w?/[\d.?]+\w? \[.*\]\s*$|^.*: *[\d.]+\w? \w+ \[[\d:]+, .*\]\s*$")
_GIT = re.compile(r"^fatal: not a git repository\b")
# What its bootstrap of a standard error prints (to stdout) before its bar.
_BOOTSTRAP = re.compile(r"^bootstrapping for stddev: \w+\s*$")
# lm-eval's model methods that take `disable_tqdm` (its own switch for the bars over the requests).
_REQUESTS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def quiet_requests(lm: Any) -> Any:
    """`lm` (lm-eval's `LM`) running its requests with `disable_tqdm=True`; returns `lm`."""
    for name in _REQUESTS:
        method = getattr(lm, name, None)
        if method is not None:
            setattr(lm, name, functools.partial(method, disable_tqdm=True))
    return lm


@contextmanager
def quiet_lm_eval(quiet: bool = True) -> Iterator[None]:
    """Within the block, lm-eval's run prints no progress bar and no `fatal: not a git repository` line.

    datasets' bars are off by its own switch (restored after), and what its bootstrap prints to stdout
    (`bootstrapping for stddev: f1_score`) is dropped, the rest of stdout written back. The rest is written to
    stderr (fd 2, so that the `git` child's line is caught too) and kept: on leaving, every line that is not one of
    those bars or that `git` line is written back, so a warning or an error (and an exception's own message, shown
    later) is never lost. fd 2 is the process's: outside the main thread (a Gradio worker) only the switches apply.

    Args:
        quiet: False makes the block change nothing.
    """
    if not quiet:
        yield
        return
    import datasets

    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        text, printed = "", io.StringIO()
        try:
            with _held_back() as held, redirect_stdout(printed):
                try:
                    yield
                finally:
                    text = held()
        finally:
            lines = printed.getvalue().splitlines(keepends=True)
            said = "".join(line for line in lines if not _BOOTSTRAP.match(line))
            if said:
                sys.stdout.write(said)
            if _kept(text):
                sys.stderr.write(_kept(text))
                sys.stderr.flush()
    finally:
        if bars:
            datasets.enable_progress_bars()


@contextmanager
def _held_back() -> Iterator[Any]:
    """stderr (fd 2, and `sys.stderr` unbuffered onto it, so that writes keep their order) into a temporary file;
    yields a function returning what was written."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        writer = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="replace", newline="",
                                  write_through=True)
        try:
            with redirect_stderr(writer):
                yield lambda: (writer.flush(), held.seek(0), held.read().decode("utf-8", "replace"))[2]
        finally:
            writer.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _kept(text: str) -> str:
    r"""The lines of `text` that are not a progress bar, git's complaint or blank (a bar redraws itself after `\r`).

    >>> _kept("\rTokenizing:   0%|    | 0/6 [00:00<?, ?it/s]\rTokenizing: 100%|####| 6/6 [00:00<00:00, 9.1it/s]\n"
    ...       "fatal: not a git repository (or any of the parent directories): .git\nWARNING: kept\n")
    'WARNING: kept\n'
    """
    out = []
    for line in text.splitlines(keepends=True):
        parts = [p for p in line.rstrip("\n").split("\r") if p.strip()]
        if not parts or all(_BAR.match(p) for p in parts) or (len(parts) == 1 and _GIT.match(parts[0])):
            continue
        out.append(line)
    return "".join(out)
