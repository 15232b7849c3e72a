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
