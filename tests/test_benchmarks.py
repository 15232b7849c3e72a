"""The benchmark scripts in benchmarks/: checks that need no models and no timing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

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


def test_measure_counts_what_a_job_reads_through_read_and_not_what_it_maps(tmp_path):
    """`measure.py`'s `read_kib` (issue 25's bytes-read target is measured with it): a child that reads a 4 MiB
    file twice through read() is charged 8 MiB; one that maps it and touches every page, nothing of the file."""
    import json
    import subprocess

    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 16384)  # 4 MiB
    reader = f"for _ in range(2):\n with open({str(data)!r}, 'rb') as f: f.read()"
    mapper = (f"import mmap\nwith open({str(data)!r}, 'rb') as f:\n m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)"
              "\n assert sum(m[i] for i in range(0, len(m), 4096)) >= 0")
    got = {}
    for name, code in (("reader", reader), ("mapper", mapper)):
        result = tmp_path / f"{name}.json"
        done = subprocess.run([sys.executable, str(BENCHMARKS / "measure.py"), "--result", str(result), "--",
                               sys.executable, "-c", code])
        assert done.returncode == 0
        got[name] = json.loads(result.read_text())
        assert got[name]["rc"] == 0 and got[name]["max_rss_kib"] > 0
    base = got["mapper"]["read_kib"]  # the interpreter's own start-up reads
    assert base is not None and base < 4096
    # The two start-ups differ by a few KiB (the mapper imports mmap; each count is rounded down to a KiB): CI saw
    # 8191. Reading the file once, or mapping reads counted, would be 4 MiB off.
    assert 8192 - 128 <= got["reader"]["read_kib"] - base < 8192 + 1024, got


def test_the_report_shows_bytes_read_where_counted_and_issue_25s_targets():
    run = _bench_run()
    small = run.InputSet(*run.TARGET_SET, ("plain", "soup", "default"))
    large = run.InputSet(*run.LARGE_TARGET_SET, ("plain", "soup", "default"))
    inputs = {small.key: 1000 * 2**20, large.key: 6000 * 2**20}

    def job(name: str, wall: float, read_mib: float) -> object:
        runs = [{"wall_s": wall, "cpu_s": wall, "rss_mib": 300.0, "disk_read_mib": 0.0,
                 "read_bytes": read_mib * 2**20}] * 3
        return run.JobResult(name, runs)

    results = {small.key: {"plain": job("plain", 2.0, 5), "soup": job("soup", 3.0, 1010),
                           "default": job("default", 4.0, 1370)},
               large.key: {"plain": job("plain", 10.0, 5), "soup": job("soup", 8.0, 6010),
                           "default": job("default", 11.0, 6700)}}
    results[small.key]["default"].cold = {"wall_s": 4.5, "disk_read_mib": 1001.0}  # read from storage once
    results[large.key]["plain"].cold = {"wall_s": 12.25, "disk_read_mib": 6000.0}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in run.results_table([small, large], results, inputs)}
    # safe_open maps: its reads through read() are not counted, those from storage are
    assert rows[run.JOB_LABELS["plain"]].endswith("| mmap | 12.25 | 1.000 |")
    assert rows[run.JOB_LABELS["default"]].endswith("| 1.117 | n/a | n/a |")  # the last row of that label: 1.1B's
    targets = "\n".join(run.target_lines(results, inputs))
    assert "\n  - default merge wall ÷ plain script, 4 x 134M fp32: 2.00x (target <= 1.2x) **missed**" in targets
    assert "default merge bytes read ÷ input bytes, 4 x 134M fp32: 1.370x (target <= 1.05x) **missed**" in targets
    assert ("default merge bytes read from storage ÷ input bytes (inputs not cached), 4 x 134M fp32: 1.001x "
            "(target <= 1.05x) **met**") in targets
    assert "3 x 1.1B bf16 default merge wall ÷ soup: 1.38x (target <= 1.5x) **met**" in targets
    # A value that rounds onto its limit is shown with the digit that decides the verdict.
    for rss, shown in ((450.4, "450.4 MiB (target <= 450 MiB) **missed**"),
                       (449.6, "450 MiB (target <= 450 MiB) **met**")):
        for r in results[small.key]["default"].runs:
            r["rss_mib"] = rss
        lines = run.target_lines(results, inputs)
        assert f"- {run.JOB_LABELS['default']} peak RSS, 4 x 134M fp32: {shown}" in lines


@pytest.fixture(scope="module")
def heldout_run(tmp_path_factory):
    """benchmarks/heldout.py (issue 24) run once at its tiniest size (one seed, two digits experts, LM experts of 5
    steps, budget 1) with `--oracle`, which adds its ceiling section to the same run: (the module, its out folder,
    the committed results' bytes before the run)."""
    import importlib.util

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "path", list(sys.path))  # the script puts examples/ first for its imports
        spec = importlib.util.spec_from_file_location("benchmarks_heldout", BENCHMARKS / "heldout.py")
        heldout = importlib.util.module_from_spec(spec)
        mp.setitem(sys.modules, "benchmarks_heldout", heldout)
        spec.loader.exec_module(heldout)
        committed = heldout.COMMITTED.read_bytes() if heldout.COMMITTED.exists() else None
        out = tmp_path_factory.mktemp("heldout")
        assert heldout.main(["--seeds", "0", "--digits-n", "2", "--lm-steps", "5", "--budget", "1", "--oracle",
                             "--out", str(out)]) == 0
        yield heldout, out, committed


def test_heldout_runs_both_families_at_the_tiniest_size(heldout_run):
    # benchmarks/heldout.py (issue 24), so that the script that measures tune's default budget on held-out data
    # cannot rot.
    import json

    heldout, out, committed = heldout_run
    cases = json.loads((out / "cases.json").read_text(encoding="utf-8"))["cases"]
    assert [(c["family"], c["size"]) for c in cases] == [("digits", "N=2"), ("lm", "5 steps")]
    for c in cases:
        sign = 1 if c["higher_is_better"] else -1
        val, test = c["val"], c["test"]
        # tune chose on validation with the guarded rule: never worse there than the soup (it keeps the soup
        # unless a candidate's lead is beyond noise); the what-if `selection="best"` pick is the best there.
        assert sign * val["tune"] >= sign * val["soup"] - 1e-12
        best_val = max(sign * score for _, score in c["candidates"])
        assert best_val >= max(sign * val["soup"], sign * val["best expert"]) - 1e-12
        assert c["wins"] == (sign * test["tune"] >= max(sign * test["soup"], sign * test["best expert"]) - 1e-12)
        assert abs(c["margin"] - sign * (test["tune"] - test["soup"]) * (100 if sign > 0 else 1)) < 1e-9
        bar = max(sign * test["soup"], sign * test["best expert"])
        assert c["best_wins"] == (sign * c["best_test"] >= bar - 1e-12)
        assert abs(c["best_margin"] - sign * (c["best_test"] - test["soup"]) * (100 if sign > 0 else 1)) < 1e-9
        # soup, greedy soup, the ingredients and the one grid variant of budget 1
        assert len(c["candidates"]) == 2 + (2 if c["family"] == "digits" else 3) + 1
    text = (out / "results.md").read_text(encoding="utf-8")
    assert "python benchmarks/heldout.py --seeds 0 --digits-n 2 --lm-steps 5 --budget 1 --oracle`" in text
    assert "| digits | N=2 | 0 |" in text and "| lm | 5 steps | 0 |" in text
    wins = sum(c["wins"] for c in cases)
    assert f"test in {wins}/2 (" in text
    # --report-only rebuilds the same report from cases.json, running nothing.
    (out / "results.md").unlink()
    assert heldout.main(["--report-only", "--out", str(out)]) == 0
    assert (out / "results.md").read_text(encoding="utf-8") == text
    # Without --update-results the committed results are untouched.
    assert (heldout.COMMITTED.read_bytes() if heldout.COMMITTED.exists() else None) == committed


def test_heldout_moves_test_digits_to_validation_and_nothing_else(heldout_run):
    # --digits-val-from-test K: K test digits (stratified) join the validation digits; training splits untouched.
    import numpy as np

    heldout, out, _ = heldout_run
    splits = heldout.example("digits").load_splits()  # loaded by the run already
    moved = heldout.more_validation(splits, 180)
    assert heldout.more_validation(splits, 0) is splits
    assert (len(moved["val"].labels), len(moved["test"].labels)) == (360, 360)
    for name in ("public", "private"):
        assert moved[name] is splits[name]
    assert np.array_equal(moved["val"].images[:180], splits["val"].images)
    pooled = lambda s: sorted(map(bytes, np.concatenate([s["val"].images, s["test"].images])))  # noqa: E731
    assert pooled(moved) == pooled(splits)  # a digit moved, none lost or copied
    assert np.bincount(moved["val"].labels[180:], minlength=10).min() >= 17  # stratified: every class moved
    assert "digits: 180 validation and 540 test digits." in (out / "results.md").read_text(encoding="utf-8")


def test_heldout_oracle_is_the_best_candidate_on_test(heldout_run):
    # benchmarks/heldout.py --oracle (issue 24): after tune chose, every candidate it built is rebuilt and scored on
    # test; the oracle is the best there, so it is at least every candidate's score and at least tune's pick.
    import json

    heldout, out, _ = heldout_run
    cases = json.loads((out / "cases.json").read_text(encoding="utf-8"))["cases"]
    assert [(c["family"], c["size"]) for c in cases] == [("digits", "N=2"), ("lm", "5 steps")]
    for c in cases:
        sign, unit = (1, 100) if c["higher_is_better"] else (-1, 1)
        o, test = c["oracle"], c["test"]
        # the same candidates as tune's table, in its order (best on validation first), each with a test score
        assert [val for _, val, *_ in o["candidates"]] == [val for _, val in c["candidates"]]
        tests = [t for _, _, t, _, _ in o["candidates"]]
        assert all(sign * o["test"] >= sign * t for t in tests)
        assert o["test"] in tests and o["pick"] == o["candidates"][tests.index(o["test"])][0]
        assert sign * o["test"] >= sign * test["tune"] and sign * o["test"] >= sign * test["soup"]
        assert sign * o["test"] >= sign * test["best expert"]
        # the rebuilt candidates score as tune scored them: its pick and the best expert on validation
        assert test["tune"] in tests and test["best expert"] in tests
        assert abs(o["margin"] - sign * (o["test"] - test["soup"]) * unit) < 1e-9
        assert o["beats"] == (sign * o["test"] > max(sign * test["soup"], sign * test["best expert"]) + 1e-12)
        top3 = tests[:3]
        assert abs(o["top3_margin"] - max(sign * (t - test["soup"]) * unit for t in top3)) < 1e-9
        assert o["top3_margin"] <= o["margin"] + 1e-12
        # the split-half oracle: the best on the even test examples scored against the soup on the odd ones, and
        # the other way round (the halves are recorded per candidate: on digits, 540 examples, their mean is the
        # test score)
        halves = [(even, odd) for _, _, _, even, odd in o["candidates"]]
        if c["family"] == "digits":
            assert all(abs((even + odd) / 2 - t) < 1e-12 for (even, odd), t in zip(halves, tests))
        soup = [label for label, *_ in o["candidates"]].index("soup")
        split = [sign * (halves[max(range(len(halves)), key=lambda i: sign * halves[i][k])][1 - k]
                         - halves[soup][1 - k]) * unit for k in (0, 1)]
        assert abs(o["split_margin"] - sum(split) / 2) < 1e-9
    text = (out / "results.md").read_text(encoding="utf-8")
    assert "--budget 1 --oracle`" in text and "## The ceiling" in text
    assert "| digits | N=2 | 0 | 5 |" in text and "| lm | 5 steps | 0 | 6 |" in text
    (out / "results.md").unlink()  # --report-only rebuilds the ceiling tables too
    assert heldout.main(["--report-only", "--out", str(out)]) == 0
    assert (out / "results.md").read_text(encoding="utf-8") == text


def test_the_3b_set_is_built_tensor_by_tensor_and_run_only_when_named(tmp_path, monkeypatch):
    # Issue 25: a 3 x 3B-shaped bf16 row beside `cat`. Its inputs are written tensor by tensor (never a whole
    # model in memory) and it is too big for a full run, so only `--set 3b-bf16-n3` selects it.
    import argparse
    import subprocess

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    run = _bench_run()
    build_inputs = sys.modules["build_inputs"]
    args = argparse.Namespace(gpu=False, smoke=False, quick=False, set=None)
    assert "3b-bf16-n3" not in [s.key for s in run.input_sets(args)]
    (big,) = run.input_sets(argparse.Namespace(**{**vars(args), "set": ["3b-bf16-n3"]}))
    assert big.jobs == ("cat", "plain", "soup", "default") and big.one_output and big.size == "3213M"
    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(**build_inputs.MODELS["3b"]))
    assert sum(p.numel() for p in meta.parameters()) == build_inputs.param_count("3b") == 3_212_749_824

    monkeypatch.setitem(build_inputs.MODELS, "tied", {**build_inputs.MODELS["tiny"], "tie_word_embeddings": True})
    build_inputs.build_direct("tied", 2, tmp_path, shard_bytes=100_000, chunk=1000)
    models = []
    for i in range(2):
        folder = build_inputs.copy_dir(tmp_path, "tied", "bf16", i)
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1  # sharded, with an index
        model, info = LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert not any(info.values()), info
        assert model.dtype == torch.bfloat16 and model.lm_head.weight is model.model.embed_tokens.weight
        models.append(dict(model.named_parameters()))
    assert sum(p.numel() for p in models[0].values()) == build_inputs.param_count("tied")
    for name, p in models[0].items():  # a shared init plus a small delta per copy
        diff = (p.float() - models[1][name].float()).std().item()
        assert 0.01 < diff < 0.02, (name, diff)
        assert abs(p.float().mean().item() - (1.0 if name.endswith("norm.weight") else 0.0)) < 0.01, name

    cat = run.job_command("cat", big, [build_inputs.copy_dir(tmp_path, "tied", "bf16", i) for i in range(2)],
                          tmp_path / "out", tmp_path, None)
    assert sum(a.endswith(".safetensors") for a in cat) == 6
    assert subprocess.run(cat, capture_output=True).returncode == 0
