"""The Space's Evaluate and Tune parts (ame_hf/space_select.py and their wiring in ame_hf/space.py) on tiny
classifiers and causal LMs: the same scores and choice as `ame_hf.evaluate` / `ame_hf.tune`, best first in the
metric's direction, the selected model written into the session's work directory and pushed by the merge's Push,
and every mistake one Gradio error line."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

import ame_hf
from factories import COLORS, color_examples, load_state, markdown_rows


def handler(demo, api_name: str):
    return next(d.fn for d in demo.fns.values() if d.api_name == api_name)


@pytest.fixture(scope="module")
def test_file(tmp_path_factory) -> Path:
    """Held-out examples of the classifiers' task, drawn apart from the validation file."""
    path = tmp_path_factory.mktemp("space-select") / "test.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": COLORS[l]}) + "\n" for t, l in color_examples(60, seed=7)))
    return path


def test_evaluate_gives_ame_hf_evaluates_scores_best_first(classifiers):
    from ame_hf.space_select import evaluation_markdown, run_evaluate

    experts, val = classifiers
    result = run_evaluate("\n".join(map(str, experts)) + "\n\n", str(val), "auto", " ", None)
    assert result == ame_hf.evaluate(experts, data=val)
    assert (result.task, result.metric) == ("text-classification", "accuracy")
    table = evaluation_markdown(result)
    assert "| model | accuracy (higher is better) |" in table
    rows = markdown_rows(table)
    expected = sorted(((str(p), s) for p, s in result.scores), key=lambda row: -row[1])
    assert rows == [(ref, round(score, 4)) for ref, score in expected]
    assert rows[0][1] > rows[-1][1], "the scores must differ for the order to mean anything"

    f1 = run_evaluate("\n".join(map(str, experts)), str(val), "text-classification", "macro_f1")
    assert f1.metric == "macro_f1" and f1 == ame_hf.evaluate(experts, data=val, metric="macro_f1")


def test_evaluate_a_language_model_ranks_the_lowest_loss_first(lm_experts):
    from ame_hf.lm_evaluation import perplexity
    from ame_hf.space_select import evaluation_markdown, run_evaluate

    experts, val, _ = lm_experts
    result = run_evaluate("\n".join(map(str, experts)), str(val), "text-generation", "", 16)
    assert result == ame_hf.evaluate(experts, data=val, task="text-generation", max_length=16)
    table = evaluation_markdown(result)
    assert "| model | loss (lower is better) | perplexity |" in table
    best_ref, best = min(result.scores, key=lambda row: row[1])
    assert markdown_rows(table)[0] == (str(best_ref), round(best, 4))
    assert f"| {best:.4f} | {perplexity(best):.3f} |" in table


def test_tune_writes_what_ame_hf_tune_selects(classifiers, test_file, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from ame_hf.evaluation import evaluate_model, load_data
    from ame_hf.space_select import run_tune

    experts, val = classifiers
    calls: list[tuple[float, str]] = []
    view = run_tune("\n".join(map(str, experts)), str(val), str(test_file), tmp_path / "space", budget=2,
                    progress=lambda fraction, desc: calls.append((fraction, desc)))
    direct = ame_hf.tune(experts, tmp_path / "direct" / "merged", data=val, test_data=test_file, budget=2, progress=False)

    assert view.folder == tmp_path / "space" / "merged"
    assert (view.result.best.label, view.result.best.score) == (direct.best.label, direct.best.score)
    assert [(c.label, c.score) for c in view.result.candidates] == [(c.label, c.score) for c in direct.candidates]
    assert view.result.test_scores == direct.test_scores and set(direct.test_scores) >= {"selected", "soup"}
    # The written model is the one tune writes, loads, and scores what the table says.
    written, expected = load_state(view.folder), load_state(direct.path)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    assert AutoModelForSequenceClassification.from_pretrained(view.folder).config.num_labels == len(COLORS)
    score = evaluate_model(str(view.folder), load_data(val, "text-classification"), "text-classification")
    assert score == pytest.approx(direct.best.score, abs=1e-6)

    rows = markdown_rows(view.candidates_markdown)
    assert "| candidate (validation) | accuracy (higher is better) |" in view.candidates_markdown
    assert rows == [(c.label, round(c.score, 4)) for c in direct.candidates]
    assert len(rows) == len(experts) + 2 + 2  # ingredients, soup, greedy soup, budget
    assert f"Selected **{direct.best.label}**" in view.summary_markdown
    assert markdown_rows(view.summary_markdown.split("played no part in the choice")[1])[0] == (
        "selected", round(direct.test_scores["selected"], 4))
    assert view.card_markdown.startswith("```yaml\n") and "model-index" in view.card_markdown
    assert view.config_yaml == (direct.path / "ame_config.yaml").read_text(encoding="utf-8")
    fractions = [f for f, _ in calls]
    assert calls[0][0] == 0.0 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(direct.best.label in desc for _, desc in calls)
