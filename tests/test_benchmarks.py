"""The benchmark scripts in benchmarks/: checks that need no models and no timing."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_no_script_shadows_a_standard_module():
    # `python benchmarks/x.py` puts benchmarks/ first on sys.path: a benchmarks/profile.py was imported by
    # cProfile (inside transformers) instead of the standard `profile`, and every benchmark crashed.
    shadowing = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.stem in sys.stdlib_module_names)
    assert not shadowing, f"rename {shadowing}: they hide the standard modules of the same name"


def _bench_run():
    """benchmarks/run.py as a module (it imports neither torch nor ame_hf)."""
    import importlib.util

    if "benchmarks_run" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmarks_run", BENCHMARKS / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks_run"] = module  # its dataclasses look their module up there
        path = list(sys.path)
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path[:] = path  # it puts benchmarks/ and examples/ first, for its own imports only
    return sys.modules["benchmarks_run"]


def test_a_run_rewrites_the_committed_results_only_with_update_results(tmp_path):
    import argparse

    run = _bench_run()

    def paths(**options) -> list[str]:
        args = argparse.Namespace(**{"results": None, "update_results": False, "gpu": False, **options})
        return [str(p.relative_to(BENCHMARKS) if p.is_relative_to(BENCHMARKS) else p.relative_to(tmp_path))
                for p in run.report_paths(args, tmp_path)]

    assert paths() == ["results.md"]  # was: also benchmarks/RESULTS.md for every full run
    assert paths(gpu=True) == ["results.md"]
    assert paths(update_results=True) == ["results.md", "RESULTS.md"]
    assert paths(update_results=True, gpu=True) == ["results.md", "RESULTS-gpu.md"]
    assert paths(results=tmp_path / "mine.md") == ["results.md", "mine.md"]


def test_update_results_of_a_partial_run_is_refused_before_any_work(tmp_path, capsys):
    run = _bench_run()
    for partial in (["--quick"], ["--smoke"], ["--set", "small-fp32-n4"]):
        try:
            run.main([*partial, "--update-results", "--out", str(tmp_path / "work")])
        except SystemExit as exit_:
            assert exit_.code == 2
        else:
            raise AssertionError(f"{partial} --update-results was not refused")
        assert "--update-results replaces the committed results of a full run" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_a_report_records_the_command_without_output_locations():
    run = _bench_run()
    command = run.recorded_command(BENCHMARKS / "run.py", ["--gpu", "--runs", "2", "--out", "/tmp/bench",
                                                           "--results=/root/out/r.md", "--update-results"],
                                   run.OUTPUT_OPTIONS)
    assert command == "python benchmarks/run.py --gpu --runs 2"  # was: --out /tmp/bench --results /root/...


def test_heldout_runs_both_families_at_the_tiniest_size(tmp_path, monkeypatch):
    # benchmarks/heldout.py (issue 24): one seed, two digits experts, LM experts of 5 steps, budget 1, so
    # that the script that measures tune's default budget on held-out data cannot rot.
    import importlib.util
    import json

    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts examples/ first for its imports
    spec = importlib.util.spec_from_file_location("benchmarks_heldout", BENCHMARKS / "heldout.py")
    heldout = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "benchmarks_heldout", heldout)
    spec.loader.exec_module(heldout)
    committed = heldout.COMMITTED.read_bytes() if heldout.COMMITTED.exists() else None
    out = tmp_path / "heldout"
    assert heldout.main(["--seeds", "0", "--digits-n", "2", "--lm-steps", "5", "--budget", "1",
                         "--out", str(out)]) == 0
    cases = json.loads((out / "cases.json").read_text(encoding="utf-8"))["cases"]
    assert [(c["family"], c["size"]) for c in cases] == [("digits", "N=2"), ("lm", "5 steps")]
    for c in cases:
        sign = 1 if c["higher_is_better"] else -1
        val, test = c["val"], c["test"]
        # tune chose on validation: never worse there than the soup or the best expert.
        assert sign * val["tune"] >= max(sign * val["soup"], sign * val["best expert"]) - 1e-12
        assert c["wins"] == (sign * test["tune"] >= max(sign * test["soup"], sign * test["best expert"]) - 1e-12)
        assert abs(c["margin"] - sign * (test["tune"] - test["soup"]) * (100 if sign > 0 else 1)) < 1e-9
        # The what-if rule takes the soup unless the bootstrap says the pick is better on validation.
        assert 0 <= c["p_not_better"] <= 1
        assert c["guarded_keeps_pick"] == (c["p_not_better"] < heldout.GUARD_LEVEL)
        assert c["guarded_margin"] == (c["margin"] if c["guarded_keeps_pick"] else 0)
        # soup, greedy soup, the ingredients and the one grid variant of budget 1
        assert len(c["candidates"]) == 2 + (2 if c["family"] == "digits" else 3) + 1
    text = (out / "results.md").read_text(encoding="utf-8")
    assert "python benchmarks/heldout.py --seeds 0 --digits-n 2 --lm-steps 5 --budget 1`" in text
    assert "| digits | N=2 | 0 |" in text and "| lm | 5 steps | 0 |" in text
    wins = sum(c["wins"] for c in cases)
    assert f"test in {wins}/2 (" in text
    # --report-only rebuilds the same report from cases.json, running nothing.
    (out / "results.md").unlink()
    assert heldout.main(["--report-only", "--out", str(out)]) == 0
    assert (out / "results.md").read_text(encoding="utf-8") == text
    # Without --update-results the committed results are untouched.
    assert (heldout.COMMITTED.read_bytes() if heldout.COMMITTED.exists() else None) == committed
