"""`ame-hf tune --resume` (issue 25): a tune killed with SIGKILL after some candidates were scored, started again with
the same command and `--resume`, scores none of them again and writes every file an uninterrupted tune writes.
The number of evaluations is counted by the process itself (a wrapper around `evaluate_model` appends a line to a
file per call); the journal's lines are read after the kill, with a torn line appended as a power loss leaves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ame_hf.cli import main
from factories import assert_one_error_line

# Runs `ame-hf ARGS` with every evaluation counted in COUNT_FILE (one line per call, written as the call starts).
_COUNTED = """
import sys
import ame_hf.selection as selection, ame_hf.tuning as tuning
real = tuning.evaluate_model
def counted(*args, **kwargs):
    with open(sys.argv[1], "a") as f:
        f.write("call\\n")
    return real(*args, **kwargs)
tuning.evaluate_model = selection.evaluate_model = counted
from ame_hf.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _tune_args(experts, val, test, out: Path) -> list[str]:
    return ["tune", *map(str, experts), "--out", str(out), "--data", str(val), "--test-data", str(test),
            "--budget", "4", "--max-length", "12"]


def _start(args: list[str], count: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _COUNTED, str(count), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def _calls(count: Path) -> int:
    return len(count.read_text().splitlines()) if count.exists() else 0


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tune_killed_then_resumed_scores_nothing_twice_and_writes_what_one_run_writes(lm_experts, tmp_path, capsys):
    experts, val, test = lm_experts
    # The same output name in both places: the card's "How to use" names the folder.
    reference, out = tmp_path / "ref" / "best", tmp_path / "run" / "best"
    out.parent.mkdir()
    done = _start(_tune_args(experts, val, test, reference), tmp_path / "ref.count")
    assert done.wait(600) == 0, done.stderr.read()
    uninterrupted = _calls(tmp_path / "ref.count")

    run = _start(_tune_args(experts, val, test, out), tmp_path / "run.count")
    journal, deadline = None, time.monotonic() + 300
    while run.poll() is None and time.monotonic() < deadline:  # kill -9 once 4 scores are recorded
        found = list(out.parent.glob(".ame-tmp-*/.ame-tune-journal/scores.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 4:
            journal = found[0]
            os.kill(run.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert run.wait(60) == -signal.SIGKILL, "the tune finished before it could be killed"
    assert journal is not None and not out.exists()
    recorded = [json.loads(line)["key"] for line in journal.read_text().splitlines()]
    assert len(recorded) >= 4 and len(set(recorded)) == len(recorded)
    with open(journal, "a") as f:  # a torn last line (power loss): ignored, its score computed again
        f.write('{"key": "val candidate 9", "sco')
    key_file = journal.parent / "key.json"

    # Another command (here another budget) is refused in one line, before any work; the journal stays as it was.
    text = journal.read_text()
    code = main([*_tune_args(experts, val, test, out)[:-4], "--budget", "3", "--max-length", "12", "--resume"])
    assert_one_error_line(code, capsys.readouterr().err, "unfinished tune", "other options", "resume")
    assert journal.read_text() == text and key_file.is_file() and not out.exists()

    resumed = _start([*_tune_args(experts, val, test, out), "--resume"], tmp_path / "resumed.count")
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    # Nothing recorded was scored again: the resumed run's evaluations are the uninterrupted run's less those.
    assert _calls(tmp_path / "resumed.count") == uninterrupted - len(recorded), stderr
    assert f"resumed: {len(recorded)} score(s) taken from the journal" in stderr
    # Each recorded ingredient and candidate is listed as such in the log (the greedy soup's steps and test scores
    # are not candidates of their own).
    rows = [k for k in recorded if k.startswith(("val ingredient", "val candidate"))]
    assert stderr.count("(recorded before the resume)") == len(rows), stderr
    assert _files(out) == _files(reference)  # weights, card, ame_config.yaml, tokenizer: byte for byte
    assert not list(out.parent.glob(".ame-tmp-*"))


def test_tune_resume_with_nothing_to_resume_starts_over_and_without_it_stale_staging_goes(lm_experts, tmp_path):
    """`--resume` with no stopped tune starts from the beginning; without `--resume` a dead tune's staging folder
    (journal included) is removed, as before."""
    experts, val, test = lm_experts
    out = tmp_path / "best"
    stale = tmp_path / ".ame-tmp-999999999-best-dead"  # a pid that cannot be alive
    (stale / ".ame-tune-journal").mkdir(parents=True)
    (stale / ".ame-tune-journal" / "key.json").write_text("{}")
    assert main([*_tune_args(experts, val, test, out)[:-4], "--budget", "1", "--quiet"]) == 0
    assert (out / "ame_config.yaml").is_file() and not stale.exists()
    again = tmp_path / "again"
    assert main([*_tune_args(experts, val, test, again)[:-4], "--budget", "1", "--quiet", "--resume"]) == 0
    assert _files(again).keys() == _files(out).keys()


def test_journal_lines_are_verified_and_scores_read_back_bit_for_bit(tmp_path):
    """A line whose score was altered, or torn, is ignored (that score is computed again); a recorded float comes back
    with every bit (the pick and the card of a resumed tune are computed from it)."""
    from ame_hf.tune_journal import ScoreJournal

    journal = ScoreJournal(tmp_path, {"key": 1})
    value = 0.1 + 0.2  # 0.30000000000000004: not a short decimal
    assert journal("val candidate 0", lambda: value) == value and journal("val candidate 1", lambda: 2.5) == 2.5
    path = tmp_path / ".ame-tune-journal" / "scores.jsonl"
    path.write_text(path.read_text().replace("2.5", "0.5") + '{"key": "val candidate 2", "score": 1.0, "sha')
    again, calls = ScoreJournal(tmp_path, {"key": 2}), []
    assert again.recorded == {"val candidate 0": value}  # the key file is the first run's (not rewritten)
    assert again("val candidate 0", lambda: calls.append(0) or 9.0) == value and not calls
    assert again("val candidate 1", lambda: calls.append(1) or 2.5) == 2.5 and calls == [1]
    assert json.loads((tmp_path / ".ame-tune-journal" / "key.json").read_text()) == {"key": 1}
