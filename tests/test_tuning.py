"""`tune` (ame_hf/tuning.py) offline on tiny text classifiers: the selection rule (the best validation score
wins; ties go to the soup, then AME, then an ingredient), the written output is the selected candidate, an
ingredient copy is ame-hf's own output, and a task that does not fit is refused before any merge."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard

import ame_hf.tuning as tuning
from ame_hf import AmeConfig, merge
from ame_hf.cli import main
from ame_hf.evaluation import evaluate_model, load_data
from factories import assert_one_error_line, load_state, score_table


def test_tune_never_loses_to_soup_or_ingredients(classifiers, tmp_path, capsys):
    experts, val = classifiers
    out = tmp_path / "best"
    assert main(["tune", *map(str, experts), "--out", str(out), "--data", str(val), "--budget", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    table, selected = printed.split("\nselected: ")
    scores = score_table(table)
    assert len(scores) == 3 + 1 + 3  # ingredients, soup, budget
    label = selected.split(" (validation ")[0]
    # The selection rule: the candidate named on the `selected:` line has the best score of all candidates,
    # so it is never worse than the soup or any single ingredient.
    assert scores[label] == max(scores.values()), (label, scores)
    assert scores["soup"] <= scores[label] and all(scores[k] <= scores[label] for k in scores if k.startswith("ingredient"))
    # The written model is that candidate: the ingredient itself, or what a fresh merge with its config gives.
    if label.startswith("ingredient "):
        expected = load_state(experts[int(label.split()[1].rstrip(":"))])
    else:
        configs = {tuning._label(cfg): cfg for cfg in [AmeConfig.soup(), *tuning.default_grid()[:3]]}
        expected = load_state(merge(experts, tmp_path / "fresh", configs[label], progress=False).path)
    written = load_state(out)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected), label
    # It really scores what was reported, and its card says so.
    data = load_data(val, "text-classification")
    assert evaluate_model(str(out), data, "text-classification") == pytest.approx(scores[label], abs=1e-4)
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results[0].metric_value == pytest.approx(scores[label], abs=1e-4)
    assert f"selected: {label}" in card.text and "soup" in card.text
    assert not list(tmp_path.glob(".ame-tmp-*"))


def test_an_ame_winner_is_written_as_its_merge(berts, tmp_path, monkeypatch):
    """With scores fixed by candidate (the third merge wins), the output holds exactly that merge's weights."""
    experts, val = berts
    monkeypatch.setattr(tuning, "evaluate_model",
                        lambda model, data, task, metric="accuracy": 0.9 if "cand2" in str(model) else 0.5)
    result = tuning.tune(experts, tmp_path / "best", data=val, budget=2, progress=False)
    soup, *grid = [AmeConfig.soup(), *tuning.default_grid()[:2]]
    assert len(result.candidates) == 2 + 3 and result.best.score == max(c.score for c in result.candidates) == 0.9
    assert result.best.label == tuning._label(grid[1]) and result.best.config is not None
    written = load_state(result.path)
    expected = load_state(merge(experts, tmp_path / "fresh", grid[1], progress=False).path)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    other = load_state(merge(experts, tmp_path / "soup", soup, progress=False).path)  # so the check can fail
    assert not all(torch.equal(written[k], other[k]) for k in other)


def test_ties_go_to_the_soup_then_ame_then_an_ingredient():
    from ame_hf.tuning import Candidate

    cands = [Candidate("ingredient 0", 0.9, ingredient=0), Candidate("adam", 0.9, config=AmeConfig()),
             Candidate("soup", 0.9, config=AmeConfig.soup()), Candidate("ingredient 1", 0.8, ingredient=1)]
    assert max(cands, key=lambda c: c.rank_key).label == "soup"
    assert max(cands[:2], key=lambda c: c.rank_key).label == "adam"
    assert max(cands[3:] + cands[:1], key=lambda c: c.rank_key).label == "ingredient 0"  # higher score wins


def test_a_tune_output_that_copies_an_ingredient_is_ame_hfs_own(classifiers, tmp_path, capsys):
    """It may be replaced by `--overwrite` and pushed, and `merge --config` explains it is no merge."""
    from ame_hf.output import check_output_dir
    from ame_hf.records import Ingredient
    from ame_hf.tuning import _ingredient_output

    experts, _ = classifiers
    copy = _ingredient_output(tmp_path / "copy", Ingredient(ref=str(experts[0]), path=experts[0]), ["a", "b"], 5)
    check_output_dir(copy, overwrite=True)  # a previous ame-hf output: may be replaced
    capsys.readouterr()
    code = main(["merge", "--config", str(copy / "ame_config.yaml"), "--out", str(tmp_path / "o")])
    assert_one_error_line(code, capsys.readouterr().err, "not a merge", str(experts[0]), exit_code=1)


def test_tune_refuses_a_task_that_does_not_fit_before_any_merge(llamas, berts, tmp_path, monkeypatch, capsys):
    def no_merge(*args, **kwargs):
        raise AssertionError("merged before checking the task")

    monkeypatch.setattr(tuning, "merge", no_merge)
    _, val = berts
    capsys.readouterr()
    code = main(["tune", *map(str, llamas), "--out", str(tmp_path / "o"), "--data", str(val)])
    assert_one_error_line(code, capsys.readouterr().err, "cannot infer --task", exit_code=1)
    code = main(["tune", *map(str, llamas), "--out", str(tmp_path / "o"), "--data", str(val),
                 "--task", "text-classification"])
    err = capsys.readouterr().err
    assert code == 1 and "LlamaForCausalLM, which cannot do text-classification" in err, err
    assert not (tmp_path / "o").exists()
