"""`ame-hf evaluate`, `merge --eval-data` and `tune` offline on tiny text classifiers."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from ame_hf.cli import main
from ame_hf.errors import InvalidConfigError
from ame_hf.evaluation import evaluate_model, load_data, load_metric
from factories import make_text_classifiers


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    return make_text_classifiers(tmp_path_factory.mktemp("cls"), n=3, steps=40)


def _scores(text):
    rows = {}
    for line in text.splitlines()[2:]:
        label, _, value = line.rpartition(" ")
        rows[label.strip()] = float(value)
    return rows


def test_bundled_metrics_work_offline(monkeypatch):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    assert load_metric("accuracy").compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}
    f1 = load_metric("macro_f1").compute(predictions=[0, 0, 1], references=[0, 1, 1])["macro_f1"]
    assert f1 == pytest.approx((2 / 3 + 2 / 3) / 2)
    with pytest.raises(InvalidConfigError, match="no-such-metric"):
        load_metric("no-such-metric")


def test_evaluate_prints_every_model_and_updates_the_card(classifiers, tmp_path, capsys):
    experts, val = classifiers
    merged = tmp_path / "merged"
    assert main(["merge", *map(str, experts), "--out", str(merged), "--quiet"]) == 0
    capsys.readouterr()
    code = main(["evaluate", str(merged), *map(str, experts), "--data", str(val), "--update-card", str(merged), "--quiet"])
    assert code == 0
    scores = _scores(capsys.readouterr().out)
    assert list(scores) == [str(merged), *map(str, experts)]
    data = load_data(val, "text-classification")
    assert scores[str(experts[0])] == pytest.approx(evaluate_model(str(experts[0]), data, "text-classification"), abs=1e-4)
    card = ModelCard.load(merged / "README.md")
    result = card.data.eval_results[0]
    assert result.metric_type == "accuracy" and result.metric_value == pytest.approx(scores[str(merged)], abs=1e-4)
    assert "## Evaluation results" in card.text and "## Reproduce" in card.text


def test_merge_with_eval_data_records_model_index(classifiers, tmp_path, capsys):
    experts, val = classifiers
    out = tmp_path / "m"
    assert main(["merge", *map(str, experts), "--out", str(out), "--optimizer", "sgd", "--eval-data", str(val),
                 "--metric", "macro_f1", "--quiet"]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results[0].metric_type == "macro_f1"
    assert "merged" in capsys.readouterr().out


def test_tune_never_loses_to_soup_or_ingredients(classifiers, tmp_path, capsys):
    experts, val = classifiers
    out = tmp_path / "best"
    assert main(["tune", *map(str, experts), "--out", str(out), "--data", str(val), "--budget", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    scores = _scores(printed.split("\nselected:")[0])
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


def test_bad_data_is_one_clear_line(classifiers, tmp_path, capsys):
    experts, _ = classifiers
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "x", "label": 0}\n')
    code = main(["evaluate", str(experts[0]), "--data", str(bad)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "`text` and `label`" in err


def test_ties_go_to_the_soup_then_ame_then_an_ingredient():
    from ame_hf import AmeConfig
    from ame_hf.tuning import Candidate

    cands = [Candidate("ingredient 0", 0.9, ingredient=0), Candidate("adam", 0.9, config=AmeConfig()),
             Candidate("soup", 0.9, config=AmeConfig.soup()), Candidate("ingredient 1", 0.8, ingredient=1)]
    assert max(cands, key=lambda c: c.rank_key).label == "soup"
    assert max(cands[:2], key=lambda c: c.rank_key).label == "adam"
    assert max(cands[3:] + cands[:1], key=lambda c: c.rank_key).label == "ingredient 0"  # higher score wins


def test_merge_eval_data_with_a_task_that_does_not_fit_fails_before_the_merge(tmp_path, capsys):
    from factories import make_finetunes

    llamas = make_finetunes(tmp_path / "llamas", n=2)  # causal LMs: no text-classification head
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "a", "label": 0}\n')
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["merge", *map(str, llamas), "--out", str(out), "--eval-data", str(val), "--task",
                 "text-classification", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "text-classification" in err, err
    assert not out.exists() and not list(tmp_path.glob(".ame-tmp-*"))  # no merge was written
    capsys.readouterr()
    assert main(["merge", *map(str, llamas), "--out", str(out), "--eval-data", str(val), "--quiet"]) == 1
    assert "task" in capsys.readouterr().err and not out.exists()  # nothing to infer from a causal LM either


def test_a_tune_output_that_copies_an_ingredient_is_ame_hfs_own(classifiers, tmp_path, capsys):
    """It may be replaced by `--overwrite` and pushed, and `merge --config` explains it is no merge."""
    from ame_hf.output import check_output_dir
    from ame_hf.records import Ingredient
    from ame_hf.tuning import _ingredient_output

    experts, _ = classifiers
    copy = _ingredient_output(tmp_path / "copy", Ingredient(ref=str(experts[0]), path=experts[0]), ["a", "b"], 5)
    check_output_dir(copy, overwrite=True)  # a previous ame-hf output: may be replaced
    capsys.readouterr()
    assert main(["merge", "--config", str(copy / "ame_config.yaml"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a merge" in err and str(experts[0]) in err, err
