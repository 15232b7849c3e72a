"""Where the examples' results go and what a report records about the run behind them: a run writes
its work folder (`--out`, git-ignored); the committed results only with `--update-results`."""

from __future__ import annotations

import argparse
import shlex
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "examples" / "_work"  # git-ignored: the default home of every example's output
# Options that only say where output goes: a report leaves them out of its command, since they change
# no figure and a committed file has no use for a developer's paths. Value: whether one follows.
OUTPUT_OPTIONS = {"--out": True, "--update-results": False}


def add_update_results(parser: argparse.ArgumentParser, committed: str) -> None:
    """`--update-results`: also rewrite the committed results (`committed` names them for the help)."""
    parser.add_argument("--update-results", action="store_true",
                        help=f"also rewrite the committed {committed} (a run otherwise writes only its --out folder)")


def shown(path: Path) -> str:
    """`path` relative to the repository when inside it (as the README and reports name files)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def recorded_command(script: str | Path, argv: Sequence[str],
                     output_options: Mapping[str, bool] = OUTPUT_OPTIONS) -> str:
    """The command a report records: `python <script>` and the options that shape the results, without
    `output_options` (option -> whether a value follows it).

    >>> recorded_command(REPO / "examples/lm/run.py", ["--out", "/tmp/x", "--seeds", "0", "--update-results"])
    'python examples/lm/run.py --seeds 0'
    """
    kept, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif name in output_options:
            skip = output_options[name] and "=" not in arg
        else:
            kept.append(arg)
    return shlex.join(["python", shown(Path(script)), *kept])


def source_commit(paths: Sequence[str] = ("ame_hf", "examples")) -> str:
    """The commit the code ran at: `abc1234`, with `+ uncommitted changes in ...` when `paths` differ
    from it; `unknown` outside a git checkout."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
        except OSError:  # no git at all
            return ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    changed = [f"{p}/" for p in paths if git("status", "--porcelain", "--", p)]
    return commit + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")
