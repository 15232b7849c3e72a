"""How the command line says an error: one line, with the Python keywords its message names shown as the command's
flags (`relative_lr` -> `--relative-lr`, `overwrite=True` -> `--overwrite`). Errors are written once, for the Python
API; this is where the CLI translates them."""

from __future__ import annotations

import re
import shlex
from typing import Sequence

# The Python keywords whose command-line form is not `--` + the keyword with dashes, per command. Error
# messages name keywords; the CLI shows them as these flags (and tests/test_interface.py reads this). The
# commands listed are those whose options are the Python API's keywords: only their errors are rewritten.
RENAMED = {
    "merge": {"ingredients": "REF", "out_dir": "--out", "data": "--eval-data"},
    "check": {"ingredients": "REF"},
    "evaluate": {"models": "MODEL", "batch_size": "--eval-batch-size"},
    "tune": {"ingredients": "REF", "out_dir": "--out", "batch_size": "--eval-batch-size"},
    "push": {"source": "DIR"},
}


def flag(command: str, keyword: str) -> str:
    """The command-line form of a Python keyword of `command` (`relative_lr` -> `--relative-lr`).

    >>> flag("merge", "relative_lr"), flag("tune", "batch_size")
    ('--relative-lr', '--eval-batch-size')
    """
    return RENAMED.get(command, {}).get(keyword, "--" + keyword.replace("_", "-"))


def error_line(err: BaseException, command: str | None) -> str:
    """An error as one line, with the keywords it names (any `AmeError`'s `fields`) shown as flags.

    See `as_flags` for how a message names a keyword.
    """
    text = one_line(err)
    fields = getattr(err, "fields", ())
    if not fields or command not in RENAMED:
        return text
    return as_flags(text, fields, command)


def as_flags(text: str, keywords: Sequence[str], command: str, *, marked_only: bool = False) -> str:
    """`text` with the `keywords` it names shown as `command`'s flags.

    A keyword written as a Python caller passes it becomes the flag with its value: `overwrite=True` ->
    `--overwrite`, `device='cpu'` -> `--device cpu`, `base=REF` -> `--base REF`. A message that names a keyword
    so is rewritten there only, and may use the keyword as a plain word elsewhere (`no such CUDA device`);
    otherwise (unless `marked_only`) every bare occurrence is the keyword (`give either lr or relative_lr`).
    Quoted values, paths and repo IDs are left as they are: `--pivot 'pivot'`, `org/base`.

    >>> as_flags("device='cuda:7': no such CUDA device; use device='cpu'", ["device"], "merge")
    '--device cuda:7: no such CUDA device; use --device cpu'
    >>> as_flags("out_dir 'x' holds an output; pass overwrite=True or choose another out_dir", ["out_dir", "overwrite"],
    ...          "merge")
    "--out 'x' holds an output; pass --overwrite or choose another --out"
    >>> as_flags("the pivot lacks the ingredients' modules: choose pivot='mean'", ["pivot"], "check", marked_only=True)
    "the pivot lacks the ingredients' modules: choose --pivot mean"
    """
    for keyword in sorted(keywords, key=len, reverse=True):
        text = _as_flag(text, keyword, flag(command, keyword), marked_only)
    return text


def _as_flag(text: str, keyword: str, option: str, marked_only: bool) -> str:
    """`as_flags` for one keyword."""
    name = r"(?<![\w./-])" + re.escape(keyword)
    marked = re.compile(name + r"=(?:(True)\b|'([^']*)')?")
    if marked.search(text):
        pattern = marked
    elif marked_only:
        return text
    else:
        pattern = re.compile(name + r"(?![\w/-])")
    # A quoted value opens after a space, `=` or `(` (not after a word: `the ingredients' folders` is no quote).
    quoted = [m.span() for m in re.finditer(r"(?<!\w)'[^']*'(?!\w)", text)]

    def shown(m: re.Match) -> str:
        if any(start <= m.start() < end for start, end in quoted):
            return m.group(0)
        if pattern is not marked or m.group(1):  # a bare keyword, or `=True`
            return option
        value = m.group(2)  # None for `base=REF`
        return f"{option} " + ("" if value is None else value if value and shlex.quote(value) == value else repr(value))

    return pattern.sub(shown, text)


def one_line(err: BaseException) -> str:
    """An error's message on one line (its class name when it has none).

    Args:
        err: any exception.

    Returns:
        The line.

    >>> one_line(ValueError("two\\n   lines"))
    'two lines'
    """
    return " ".join(str(err).split()) or type(err).__name__
