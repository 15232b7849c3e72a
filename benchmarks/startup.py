"""How long `ame-hf` takes to answer when there is nothing to merge: `--help` and two user mistakes.

    python benchmarks/startup.py            # median of 5 processes per command, after one warm-up each
    python benchmarks/startup.py --runs 9 --results startup.md

Each command is the installed `ame-hf` console script (the one beside this Python), run as a fresh
process from an empty temporary directory, timed from start to exit (whole-process wall time). The
commands take turns, one warm-up round is discarded (so that every run reads torch and friends from
the page cache). `--help` must exit with 0, a mistake with a non-zero code and the `error:` line
it is meant to trigger (the table shows both), else the benchmark stops: it must time that error,
not a crash or another error. `--out` lies inside the empty directory, so that whatever is left in
/tmp cannot turn the bad path into an "--out is not empty" error. Prints a Markdown table (also
written to `--results` when given). Needs no models and no network.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import environment  # noqa: E402  (no torch at import time)

RUN_TIMEOUT = 300.0  # s; a run that hangs (say, on the network) must not hang the benchmark


@dataclass
class Case:
    label: str
    args: list[str]
    expect: str | None  # a mistake: its `error:` line must contain this; None: must exit with 0
    seconds: list[float] = field(default_factory=list)
    exit_code: int = 0
    message: str = ""  # the last `error:` line of stderr, to show which error was measured


CASES = [
    Case("help", ["--help"], expect=None),
    Case("bad path", ["merge", "./does-not-exist-a", "./does-not-exist-b", "--out", "x"], expect="does-not-exist-a"),
    Case("bad option value", ["merge", "a", "b", "--out", "x", "--lr", "abc"], expect="--lr"),
]


def ame_hf_command() -> list[str]:
    """The console script of this Python's environment (what a user types), else `python -m ame_hf`."""
    script = Path(sys.executable).parent / "ame-hf"
    if script.is_file():
        return [str(script)]
    found = shutil.which("ame-hf")
    return [found] if found else [sys.executable, "-m", "ame_hf"]


def run_once(cmd: list[str], case: Case, cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd + case.args, cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    seconds = time.perf_counter() - started
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    mistake = case.expect is not None
    if ((proc.returncode != 0) != mistake or "Traceback" in proc.stderr
            or (mistake and not (errors and case.expect in errors[-1]))):
        expected = f"a non-zero exit and an `error:` line naming {case.expect!r}" if mistake else "exit code 0"
        raise SystemExit(f"{shlex.join(cmd + case.args)} exited with {proc.returncode} "
                         f"(expected {expected}):\n{proc.stderr[-2000:]}")
    case.exit_code, case.message = proc.returncode, errors[-1].strip() if errors else "usage"
    return seconds


def results_table(cases: list[Case], runs: int, cmd: list[str]) -> list[str]:
    env = environment("mergekit not used")
    lines = [f"- command: `python benchmarks/startup.py --runs {runs}`; `ame-hf` = `{shlex.join(cmd)}`",
             f"- machine: {env['machine']}", f"- software: {env['software'].split('; mergekit')[0]}", "",
             f"| `ame-hf ...` | what it prints | exit code | median wall s (of {runs}) | min s | max s |",
             "|---|---|---|---|---|---|"]
    for case in cases:
        message = case.message.replace("|", r"\|")  # a `|` would end the table cell
        lines.append(f"| `{shlex.join(case.args)}` ({case.label}) | {message} | {case.exit_code} | "
                     f"{statistics.median(case.seconds):.2f} | {min(case.seconds):.2f} | {max(case.seconds):.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="timed processes per command after the warm-up (default 5)")
    p.add_argument("--results", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    cmd = ame_hf_command()
    with tempfile.TemporaryDirectory(prefix="ame-startup-") as empty:  # no `a`, `b` or `x` to find
        for round_ in range(args.runs + 1):
            for case in CASES:
                seconds = run_once(cmd, case, Path(empty))
                if round_:  # round 0 is the warm-up
                    case.seconds.append(seconds)
            print(f"[startup] round {round_}/{args.runs} done{' (warm-up)' if not round_ else ''}",
                  file=sys.stderr, flush=True)
    text = "\n".join(results_table(CASES, args.runs, cmd)) + "\n"
    print(text)
    if args.results is not None:
        args.results.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
