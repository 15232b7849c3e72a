"""`tune`'s selection rule (`ame_hf.guard`): a candidate is kept only when its paired per-example lead over the soup
is beyond validation noise (the largest one-sided 95 % lower bound, above 0), else the soup; and the per-example
scores `evaluate_model` gives (accuracy per example, NLL per document) add up to its own score."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from ame_hf import AmeConfig, InvalidConfigError, merge
from ame_hf import tuning
from ame_hf.evaluation import evaluate_model, load_data
from ame_hf.guard import Z, Examples, paired_lead
from ame_hf.ranking import Candidate
from factories import load_state

N = 200  # validation examples


def correct(right: set[int]) -> tuple[list[float], list[float]]:
    """Accuracy per example: 1.0 on the examples in `right`."""
    return [float(i in right) for i in range(N)], [1.0] * N


SOUP = set(range(120))  # the soup gets 120 of 200 right
NOISY = (SOUP - {0, 1, 2, 3, 4, 5}) | set(range(120, 132))  # +12 -6: a 3-point lead, within noise
CLEAR = SOUP | set(range(120, 136))  # +16 -0: an 8-point lead, clearly beyond noise
BIG_NOISY = (SOUP - set(range(30))) | set(range(120, 170))  # +50 -30: a 10-point lead, the best score, but noisy


def test_the_lead_and_its_error_are_the_paired_difference_and_its_standard_error():
    """Against an independent float64 computation: the lead is the difference of the two scores; for accuracy
    the standard error is the sample standard deviation of the per-example differences over sqrt(n)."""
    lead = paired_lead(correct(NOISY), correct(SOUP), higher=True)
    diffs = [float(i in NOISY) - float(i in SOUP) for i in range(N)]
    assert lead.lead == pytest.approx(len(NOISY) / N - len(SOUP) / N, abs=1e-15) == pytest.approx(0.03)
    assert lead.se == pytest.approx(statistics.stdev(diffs) / math.sqrt(N), rel=1e-12)
    assert lead.bound == pytest.approx(lead.lead - Z * lead.se)
    # A loss: summed NLL per document over its tokens, lower is better; the lead is the drop in the mean token loss.
    tokens = [float(5 + i % 7) for i in range(N)]
    soup = [2.0 * n + (i % 3) * 0.1 for i, n in enumerate(tokens)]
    cand = [s - 0.05 * n + (0.2 if i % 2 else -0.2) for i, (s, n) in enumerate(zip(soup, tokens))]
    loss = paired_lead((cand, tokens), (soup, tokens), higher=False)
    assert loss.lead == pytest.approx(sum(soup) / sum(tokens) - sum(cand) / sum(tokens), rel=1e-12)
    ratio = [(s - c) - loss.lead * n for s, c, n in zip(soup, cand, tokens)]
    assert loss.se == pytest.approx(math.sqrt(N / (N - 1) * sum(r * r for r in ratio)) / sum(tokens), rel=1e-12)
    # Not the same examples: no lead.
    assert paired_lead((cand[:-1], tokens[:-1]), (soup, tokens), higher=False) is None


def _book(scores: dict[str, set[int]], selection: str = "guarded") -> tuple[Examples, list[Candidate]]:
    book, cands = Examples(selection, "accuracy"), []
    for label, right in scores.items():
        cand = Candidate(label, len(right) / N, config=AmeConfig.soup() if label == "soup" else AmeConfig())
        book.of[id(cand)] = correct(right)
        cands.append(cand)
    return book, cands


def test_a_lead_within_noise_falls_back_to_the_soup_and_a_clear_win_is_kept():
    book, cands = _book({"soup": SOUP, "noisy": NOISY})
    pick, why = book.choose(cands)
    assert pick.label == "soup" and "beyond noise" in why and "noisy" in why
    assert _book({"soup": SOUP, "noisy": NOISY}, "best")[0].choose(cands)[0].label == "noisy"  # as before
    book, cands = _book({"soup": SOUP, "noisy": NOISY, "clear": CLEAR})
    pick, why = book.choose(cands)
    assert pick.label == "clear" and "8.00 points" in why and "above 0" in why


def test_without_per_example_scores_the_best_score_is_kept():
    """A metric that is no mean over examples (macro_f1, lm-eval tasks) leaves the candidates without per-example
    scores: the guard cannot apply, and the card says so."""
    book, cands = _book({"soup": SOUP, "noisy": NOISY})
    book.of = dict.fromkeys(book.of)
    pick, why = book.choose(cands)
    assert pick.label == "noisy" and "cannot apply" in why


def test_the_surest_lead_wins_over_the_best_score():
    """A candidate with the best validation score but a lead built on many flipped examples loses to one whose
    smaller lead is sure; `selection="best"` takes the best score."""
    scores = {"soup": SOUP, "big but noisy": BIG_NOISY, "clear": CLEAR}
    book, cands = _book(scores)
    assert max(cands, key=lambda c: c.score).label == "big but noisy"
    assert paired_lead(correct(BIG_NOISY), correct(SOUP), True).bound < paired_lead(correct(CLEAR), correct(SOUP),
                                                                                    True).bound
    pick, why = book.choose(cands)
    assert pick.label == "clear" and "big but noisy" in why
    assert _book(scores, "best")[0].choose(cands)[0].label == "big but noisy"


def test_per_example_scores_add_up_to_the_score(lm_experts, classifiers):
    """`evaluate_model(per_example=...)`: per-document NLLs over tokens give the mean token loss, right/wrong per
    example the accuracy; a metric that is no mean over examples adds nothing."""
    experts, val, _ = lm_experts
    data = load_data(val, "text-generation")
    got: list = []
    loss = evaluate_model(str(experts[0]), data, "text-generation", per_example=got)
    (nll, tokens), = got
    assert len(nll) == len(data.texts) and math.fsum(nll) / math.fsum(tokens) == pytest.approx(loss, rel=1e-5)
    cls, cls_val = classifiers
    labelled = load_data(cls_val, "text-classification")
    got = []
    acc = evaluate_model(str(cls[0]), labelled, "text-classification", per_example=got)
    assert got[0][1] == [1.0] * len(labelled) and sum(got[0][0]) / len(labelled) == pytest.approx(acc, abs=1e-12)
    got = []
    evaluate_model(str(cls[0]), labelled, "text-classification", "macro_f1", per_example=got)
    assert got == []


@pytest.mark.parametrize("selection, winner", [("guarded", "soup"), ("best", "variant"), ("clear", "variant")])
def test_tune_keeps_the_soup_when_the_best_candidate_leads_within_noise(berts, tmp_path, monkeypatch, selection,
                                                                        winner):
    """The first AME variant has the best validation score, 3 points over the soup on 200 examples, within noise:
    `tune` writes the soup (`selection="guarded"`, the default) and says why in the card; `selection="best"`
    writes the variant; with a clear lead (8 points, no example lost) the guarded rule keeps the variant too."""
    experts, val = berts
    lead = CLEAR if selection == "clear" else NOISY

    def score(model, data, task, metric=None, per_example=None, **kw):
        name = str(getattr(model, "ame_candidate", model))
        right = lead if "cand1" in name else SOUP if "cand0" in name or "greedy" in name else set(range(100))
        if per_example is not None:
            per_example.append(correct(right))
        return len(right) / N

    monkeypatch.setattr(tuning, "evaluate_model", score)
    kwargs = {} if selection == "guarded" else {"selection": "best" if selection == "best" else "guarded"}
    result = tuning.tune(experts, tmp_path / "out", data=val, budget=2, progress=False, **kwargs)
    assert result.candidates[0].label == tuning._label(tuning.default_grid()[0])  # the best validation score
    expected_cfg = AmeConfig.soup() if winner == "soup" else tuning.default_grid()[0]
    assert result.best.label == tuning._label(expected_cfg)
    written = load_state(result.path)
    expected = load_state(merge(experts, tmp_path / "fresh", expected_cfg, progress=False).path)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    card = ModelCard.load(Path(result.path) / "README.md").text
    assert "## Why this pick" in card
    assert ("no candidate beats it" in card) == (winner == "soup")


def test_an_unknown_selection_is_refused_before_anything_runs(berts, tmp_path):
    experts, val = berts
    with pytest.raises(InvalidConfigError, match="selection='maybe' is not one of: guarded, best") as caught:
        tuning.tune(experts, tmp_path / "never", data=val, selection="maybe")
    assert caught.value.field == "selection" and not (tmp_path / "never").exists()
