"""The greedy soup's trials never touch the disk (issue 24): each trial soup is built straight into a model in
memory (`in_memory.merge_model`), scored and dropped; only the selected soup is written, by `merge` itself.
References: `merge`'s own output for each trial's recipe (the same tensors, bit for bit), the same greedy soup with
every trial written to disk (the behaviour before: the same steps, scores and output files), and the bytes the
process wrote (`/proc/self/io`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

import ame_hf.selection as selection
import ame_hf.tuning as tuning
from ame_hf import AmeConfig, merge
from factories import load_state, weights_sha256


def _written_bytes() -> int:
    with open("/proc/self/io", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def _weight_files(*roots: Path) -> set[Path]:
    """Weight files under `roots`, and in ame-hf's own folders of the temp dir (other processes' are not ours)."""
    temp = [p for p in Path(tempfile.gettempdir()).glob("ame-hf-adapters-*") if p.is_dir()]
    return {p for root in [*roots, *temp] for p in Path(root).rglob("*.safetensors")}


def _trials(steps) -> list[list[int]]:
    """Each trial's ingredients, from the steps: the kept ones so far plus the one tried."""
    kept, trials = [steps[0][0]], []
    for i, _, ok in steps[1:]:
        trials.append(sorted(kept + [i]))
        kept = trials[-1] if ok else kept
    return trials


def test_greedy_soup_trials_hold_merges_tensors_and_nothing_but_the_output_is_written(lm_experts, tmp_path,
                                                                                     monkeypatch):
    """Scored by distance to the mean of ingredients 0 and 2, the walk keeps 0 and 2 (two trials): each trial is a
    model in memory whose tensors equal `merge`'s for its recipe; no weight file appears anywhere while the trials
    are scored, and the process writes little more than the output's bytes (before: every trial was written)."""
    experts, val, _ = lm_experts
    states = [load_state(e) for e in experts]
    target = {k: (states[0][k].double() + states[2][k].double()) / 2 for k in states[0]
              if states[0][k].is_floating_point()}
    roots = [tmp_path, *[Path(e) for e in experts]]
    before_files = _weight_files(*roots)
    trials: dict[str, dict[str, torch.Tensor]] = {}

    def score(model, data, task, metric=None, **kwargs) -> float:
        if hasattr(model, "state_dict"):  # a trial in memory: keep its tensors to compare with merge's
            trials[model.ame_candidate] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            state = model.state_dict()
        else:
            state = load_state(str(model))
        assert _weight_files(*roots) == before_files, "a weight file was written while scoring"
        return float(sum(((state[k].double() - target[k]) ** 2).sum() for k in target) ** 0.5)

    monkeypatch.setattr(selection, "evaluate_model", score)
    started = _written_bytes()
    result = selection.greedy_soup(experts, tmp_path / "greedy", data=val, metric="loss")
    written = _written_bytes() - started
    assert result.kept == [0, 2] and len(result.steps) == 3
    output = sum(f.stat().st_size for f in result.path.rglob("*") if f.is_file())
    weights = sum(f.stat().st_size for f in result.path.glob("*.safetensors"))
    # The output once, plus the card rewritten with its scores (small): no trial's weights (each ~ `weights`).
    assert written < output + weights / 2, (written, output, weights)
    assert sorted(trials) == ["greedy0", "greedy1"]
    for n, kept in enumerate(_trials(result.steps)):
        fresh = load_state(merge([experts[k] for k in kept], tmp_path / f"ref{n}", AmeConfig.soup(),
                                 progress=False).path)
        state = trials[f"greedy{n}"]
        assert all(state[k].dtype == fresh[k].dtype and torch.equal(state[k], fresh[k]) for k in fresh), kept
    reference = merge([experts[0], experts[2]], tmp_path / "kept", AmeConfig.soup(), progress=False).path
    assert weights_sha256(result.path) == weights_sha256(reference)
    assert not list(tmp_path.glob(".ame-tmp-*"))


def test_greedy_soup_in_memory_gives_what_the_disk_gave(lm_experts, tmp_path, monkeypatch):
    """Real validation losses: the same steps, scores and output files (card, ame_config.yaml, weights) as the same
    greedy soup with every trial written to disk and scored from its folder (the behaviour before issue 24)."""
    experts, val, test = lm_experts
    in_memory = selection.greedy_soup(experts, tmp_path / "memory" / "greedy", data=val, test_data=test)
    monkeypatch.setattr(selection, "merge_model", lambda *args, **kwargs: None)  # every trial on disk, as before
    on_disk = selection.greedy_soup(experts, tmp_path / "disk" / "greedy", data=val, test_data=test)
    assert in_memory.steps == on_disk.steps and in_memory.kept == on_disk.kept
    assert in_memory.test_scores == on_disk.test_scores
    files = sorted(p.relative_to(in_memory.path) for p in in_memory.path.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(on_disk.path) for p in on_disk.path.rglob("*") if p.is_file())
    for name in files:
        assert (in_memory.path / name).read_bytes() == (on_disk.path / name).read_bytes(), name


@pytest.mark.parametrize("winner", ["greedy", "cand1"])
def test_tune_writes_no_greedy_soup_trial(berts, tmp_path, monkeypatch, winner):
    """Inside `tune`, the greedy soup's trials are built in memory too: no merge is written but the pick (the greedy
    soup, or an AME candidate after a greedy soup that kept both ingredients), by merge: the bytes of `merge` for
    its recipe. (Before, the greedy soup's trial was written as well.)"""
    experts, val = berts
    writes = []
    real = selection.merge

    def counted(refs, target, *args, **kwargs):
        writes.append(target)
        return real(refs, target, *args, **kwargs)

    def score(model, data, task, metric=None, **kw) -> float:  # a folder, or a model named like its folder
        name = str(getattr(model, "ame_candidate", model))
        return 0.9 if winner in name else 0.7 if "greedy" in name else 0.5

    monkeypatch.setattr(selection, "merge", counted)
    monkeypatch.setattr(tuning, "merge", counted)
    monkeypatch.setattr(tuning, "evaluate_model", score)
    result = tuning.tune(experts, tmp_path / "best", data=val, budget=1, progress=False)
    assert len(writes) == 1, writes  # the pick only
    if winner == "greedy":
        assert result.best.label.startswith("greedy soup (kept 0, 1)"), result.best
        recipe = AmeConfig.soup()
    else:
        assert result.best.config == tuning.default_grid()[0].resolved(), result.best
        recipe = tuning.default_grid()[0]
    fresh = real(experts, tmp_path / "fresh", recipe, progress=False).path
    assert weights_sha256(result.path) == weights_sha256(fresh)


def test_tune_with_greedy_trials_in_memory_writes_what_it_wrote_with_them_on_disk(lm_experts, tmp_path, monkeypatch):
    """Real validation losses and the default (guarded) selection, which reads each candidate's per-example scores:
    every output file (weights, card with its "Why this pick", ame_config.yaml) is the same as with the greedy
    soup's trials written to disk and scored from their folders."""
    experts, val, test = lm_experts
    outputs = []
    for where in ("memory", "disk"):
        if where == "disk":
            monkeypatch.setattr(selection, "merge_model", lambda *args, **kwargs: None)
        out = tmp_path / where / "best"
        tuning.tune(experts, out, data=val, test_data=test, budget=2, max_length=12, progress=False)
        outputs.append({p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert outputs[0] == outputs[1]
