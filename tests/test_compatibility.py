"""The compatibility report (ame_hf/compatibility.py) on Hub ingredients: `check` names every config field,
tensor name and shape that differs, and exits 1 when the checkpoints cannot be merged."""

from __future__ import annotations

from ame_hf import check
from ame_hf.cli import main


def test_check_reports_differences_by_name(repos, capsys):
    report = check(["org/hub-a", "org/hub-wide"])
    # Shapes decide errors; the config key that made them is a note, and named in the summary.
    assert not report.ok and any("intermediate_size" in n for n in report.notes)
    assert "intermediate_size" in report.summary()
    assert any("mlp.up_proj.weight" in e and "[32, 16]" in e and "[48, 16]" in e for e in report.errors)
    capsys.readouterr()
    assert main(["check", "org/hub-a", "org/hub-bert"]) == 1
    out = capsys.readouterr().out
    assert "model_type" in out and "'llama'" in out and "'bert'" in out
    assert "missing tensor(s)" in out and "lm_head.weight" in out
    assert main(["check", "org/hub-a", "org/hub-b"]) == 0
