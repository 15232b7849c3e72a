"""`tune` (ame_hf/tuning.py) offline on tiny text classifiers: the selection (ties go to the soup, then AME,
then an ingredient), an ingredient copy is ame-hf's own output, and a task that does not fit is refused
before any merge."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

import ame_hf.tuning as tuning
from ame_hf import AmeConfig
from ame_hf.cli import main
from ame_hf.evaluation import evaluate_model, load_data
from factories import assert_one_error_line, score_table


def test_tune_never_loses_to_soup_or_ingredients(classifiers, tmp_path, capsys):
    experts, val = classifiers
    out = tmp_path / "best"
    assert main(["tune", *map(str, experts), "--out", str(out), "--data", str(val), "--budget", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    scores = score_table(printed.split("\nselected:")[0])
    assert len(scores) == 3 + 1 + 3  # ingredients, soup, budget
    best = max(scores.values())
    assert scores["soup"] <= best and all(scores[k] <= best for k in scores if k.startswith("ingredient"))
    # The written model really scores what was reported, and its card says so.
    data = load_data(val, "text-classification")
    assert evaluate_model(str(out), data, "text-classification") == pytest.approx(best, abs=1e-4)
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results[0].metric_value == pytest.approx(best, abs=1e-4)
    assert "selected:" in card.text and "soup" in card.text
    assert not list(tmp_path.glob(".ame-tmp-*"))


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
