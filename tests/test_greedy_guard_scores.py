"""`tune`'s guard compares the greedy soup with the soup using the greedy soup's own per-example validation scores:
those of the kept trial, not of the last trial scored (the greedy soup's trials are built in memory, so no folder
says which trial was kept). Four ingredients, the last a damaged copy of the first: the greedy soup keeps a merge of
good ones and rejects its last trial (the one adding the damaged ingredient). The reference is `evaluate_model` on the kept
soup written by `merge`, in a fresh run and in a resumed one (the journal's per-example scores replayed)."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM

import ame_hf.tuning as tuning
from ame_hf import AmeConfig, merge
from ame_hf.evaluation import evaluate_model, load_data
from ame_hf.guard import Examples, paired_lead
from factories import count_scored, perturb

MAX_LENGTH = 12


@pytest.fixture(scope="module")
def four(lm_experts, tmp_path_factory):
    """The three demo experts and a copy of the first with every weight moved by noise of std 1 (it scores worst,
    so the greedy soup tries it last and rejects it)."""
    experts, val, _ = lm_experts
    damaged = tmp_path_factory.mktemp("damaged") / "expert-damaged"
    shutil.copytree(experts[0], damaged)
    model = AutoModelForCausalLM.from_pretrained(experts[0])
    perturb(model.parameters(), seed=7, scale=1.0)
    model.save_pretrained(damaged)
    return [*experts, damaged], val


def _each(model, val) -> list[list[float]]:
    """The per-example validation losses of `model` (a folder), as lists of floats."""
    each: list = []
    evaluate_model(str(model), load_data(val, "text-generation"), "text-generation", "loss", max_length=MAX_LENGTH,
                   per_example=each)
    return [[float(x) for x in part] for part in each[0]]


def _seen(monkeypatch) -> dict[str, list[list[float]] | None]:
    """Spies on the guard: label -> the per-example scores it holds for each candidate when it chooses (the real
    `Examples`, unchanged, with its `choose` noting what it was given)."""
    seen: dict[str, list[list[float]] | None] = {}

    class Seen(Examples):
        def choose(self, candidates):
            for c in candidates:
                each = self.of.get(id(c))
                seen[c.label] = None if each is None else [[float(x) for x in part] for part in each]
            return super().choose(candidates)

    monkeypatch.setattr(tuning, "Examples", Seen)
    return seen


def _greedy(seen) -> tuple[str, list[int]]:
    (label,) = [k for k in seen if k.startswith("greedy soup (kept ")]
    kept = [int(i) for i in label[len("greedy soup (kept "):].split(")")[0].split(", ")]
    return label, kept


def _check(seen, experts, val, tmp_path, result) -> None:
    label, kept = _greedy(seen)
    assert len(kept) > 1 and 3 not in kept, label  # a merge, and the last trial (with the damaged one) rejected
    kept_soup = merge([experts[k] for k in kept], tmp_path / "kept-soup", AmeConfig.soup(), progress=False).path
    reference = _each(kept_soup, val)
    last = merge([experts[k] for k in kept + [3]], tmp_path / "last", AmeConfig.soup(), progress=False).path
    soup = _each(merge(experts, tmp_path / "soup", AmeConfig.soup(), progress=False).path, val)
    assert reference != _each(last, val)  # else the test could not tell the kept trial from the last one
    assert seen[label] == reference, "the guard holds the greedy soup's last trial's per-example scores, not the kept's"
    # The guard picks the greedy soup (its lead over the soup, which holds the damaged ingredient, is far beyond
    # noise); the output is the kept soup, and the card's "Why this pick" gives its lead from the kept's scores.
    assert result.best.label == label, result.best
    assert _each(result.path, val) == reference
    lead = paired_lead(tuple(reference), tuple(soup), higher=False)
    why = (result.path / "README.md").read_text()
    assert f"its validation lead over the soup, {lead.lead:.4f} nats per token ± {lead.se:.4f}" in why


def test_tune_guard_gets_the_kept_greedy_trials_per_example_scores(four, tmp_path, monkeypatch):
    """The greedy soup's trials built in memory (no folder): the guard holds the kept soup's per-example scores."""
    experts, val = four
    seen = _seen(monkeypatch)
    result = tuning.tune(experts, tmp_path / "best", data=val, budget=0, max_length=MAX_LENGTH, progress=False)
    _check(seen, experts, val, tmp_path, result)


def test_resumed_tune_guard_gets_the_kept_greedy_trials_per_example_scores_from_the_journal(four, tmp_path,
                                                                                            monkeypatch):
    """A tune stopped (an error) at its first AME candidate, after the greedy soup: its journal holds each trial's
    per-example scores; resumed, the guard is handed the kept trial's from the journal (no trial scored again)."""
    experts, val = four
    scored = count_scored(monkeypatch, stop_at="cand1")
    out = tmp_path / "best"
    with pytest.raises(RuntimeError, match="stopped"):
        tuning.tune(experts, out, data=val, budget=1, max_length=MAX_LENGTH, progress=False, resume=True)
    (journal,) = tmp_path.glob(".*/.ame-tune-journal/scores.jsonl")
    recorded = {e["key"]: e for e in map(json.loads, journal.read_text().splitlines())}
    trials = sorted(k for k in recorded if k.startswith("greedy soup "))
    assert trials, recorded
    for key in trials:  # each trial's per-example scores, as scoring its soup gives them
        merged = merge([experts[int(k)] for k in key.split()[-1].split(",")], tmp_path / key.replace(" ", "-"),
                       AmeConfig.soup(), progress=False).path
        assert recorded[key]["each"] == _each(merged, val), key

    assert any("greedy" in s for s in scored), scored  # the greedy soup's trials were scored before the stop

    scored = count_scored(monkeypatch)  # no stop now; each model scored counted afresh
    seen = _seen(monkeypatch)
    result = tuning.tune(experts, out, data=val, budget=1, max_length=MAX_LENGTH, progress=False, resume=True)
    assert not any("greedy" in s for s in scored), scored  # the trials' scores came from the journal
    _check(seen, experts, val, tmp_path / "check", result)
