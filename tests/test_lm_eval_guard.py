"""`tune`'s guard on lm-evaluation-harness scores: lm-eval's own per-document values are the per-example scores of an
lm-eval candidate (each task's documents weighted as `tune` weights the task scores), they survive a resume, a lead
within noise keeps the soup, a clear one is picked with its bound on the card, and a metric lm-eval does not average
over documents still falls back (the card says so).
Tasks are local YAML + JSONL written here; the reference is lm-eval's own evaluator with `log_samples` on the written
models. The documents of `noisy` are chosen from what the models answer, so that ingredient 0 beats the soup by one
document out of 15 (3 won, 2 lost)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import ame_hf.tuning as tuning
from ame_hf import AmeConfig, merge
from ame_hf.guard import Examples, paired_lead
from ame_hf.lm_harness import RESULTS_FILE
from ame_hf.tune_journal import ScoreJournal
import test_lm_harness
from factories import count_scored
from test_lm_harness import write_task

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra (pip install 'ame-hf[lm-eval]') is in `dev`")

mc = test_lm_harness.mc  # its experts and count_mc, as a fixture of this module too
WON, LOST, TIES = 3, 2, 10  # documents of `noisy`: ingredient 0 right and the soup wrong, the reverse, both right


def _task(folder: Path, name: str, rows: list[dict], metric: str = "acc", aggregation: str = "mean") -> None:
    higher = "false" if metric == "brier_score" else "true"  # as lm-eval registers them
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / (name + '.jsonl')}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\ntarget_delimiter: \" \"\n"
        f"metric_list:\n  - metric: {metric}\n    aggregation: {aggregation}\n    higher_is_better: {higher}\n")


def samples(model: Path, tasks: Path, names: list[str]) -> dict[str, list[float]]:
    """lm-eval's own per-document `acc` of `model` (a folder) on each task, in document order."""
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model}", tasks=names, device="cpu",
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    return {n: [float(s["acc"]) for s in sorted(out["samples"][n], key=lambda s: s["doc_id"])] for n in names}


@pytest.fixture(scope="module")
def noisy(mc, tmp_path_factory):
    """Experts 0 and 1, their soup (written by `merge`), and a folder with count_mc and `noisy`: two-choice
    questions whose answers are set from what expert 0, the soup and expert 1 pick (lm-eval's own per-document
    `acc` on a pool with answer 0), so that on `noisy` expert 0 scores 13/15, the soup 12/15, expert 1 at most 5/15."""
    experts, count = mc
    root = tmp_path_factory.mktemp("noisy")
    soup = merge(experts[:2], root / "soup", AmeConfig.soup(), progress=False).path
    tasks = write_task(root / "tasks")
    pool = [{"context": f"<count> {x}", "choices": [str((x + a) % 20), str((x + b) % 20)], "label": 0}
            for x in range(20) for a, b in ((1, 3), (1, 5), (3, 5), (2, 4))]
    _task(tasks, "pool", pool)
    picks = {name: [0 if right else 1 for right in samples(model, tasks, ["pool"])["pool"]]
             for name, model in (("e0", experts[0]), ("soup", soup), ("e1", experts[1]))}
    differ = [i for i in range(len(pool)) if picks["e0"][i] != picks["soup"][i]]
    ties = [i for i in range(len(pool)) if picks["e0"][i] == picks["soup"][i] != picks["e1"][i]]
    assert len(differ) >= WON + LOST and len(ties) >= TIES, (differ, ties)  # the models are built deterministically
    chosen = [(i, "e0") for i in differ[:WON]] + [(i, "soup") for i in differ[WON:WON + LOST]] + [
        (i, "e0") for i in ties[:TIES]]
    _task(tasks, "noisy", [{**pool[i], "label": picks[who][i]} for i, who in chosen])
    return experts[:2], soup, tasks


def _seen(monkeypatch) -> dict[str, object]:
    """label -> the per-example scores the guard holds for each candidate when it chooses (the real `Examples`)."""
    seen: dict[str, object] = {}

    class Seen(Examples):
        def choose(self, candidates):
            for c in candidates:
                each = self.of.get(id(c))
                seen[c.label] = each if each is None or isinstance(each, str) else [list(map(float, p)) for p in each]
            return super().choose(candidates)

    monkeypatch.setattr(tuning, "Examples", Seen)
    return seen


def _weighted(values: dict[str, list[float]], weights: dict[str, int]) -> list[list[float]]:
    """The per-example scores of a weighted combination of tasks, computed here: a document of task t counts
    (w_t / sum w) / n_t of the score, scaled so that the weights sum to the number of documents."""
    docs, total = sum(len(v) for v in values.values()), sum(weights.values())
    num, den = [], []
    for name, w in weights.items():
        c = float(Fraction(w, total) / len(values[name]) * docs)
        num += [c * v for v in values[name]]
        den += [c] * len(values[name])
    return [num, den]


def test_an_lm_eval_candidates_per_example_scores_are_lm_evals_own_and_survive_a_resume(noisy, tmp_path,
                                                                                          monkeypatch):
    """Two tasks weighted 1 and 3: the guard holds, for each ingredient and for the soup, lm-eval's own per-document
    `acc` of that model (its evaluator with log_samples on the written model), each task's documents weighted so
    that their weighted mean is the score `tune` reports; a tune stopped before the greedy soup's trial and resumed
    takes them from its journal."""
    experts, soup, tasks = noisy
    weights = {"count_mc": 1, "noisy": 3}
    ref = {name: _weighted(samples(model, tasks, list(weights)), weights)
           for name, model in (("e0", experts[0]), ("e1", experts[1]), ("soup", soup))}
    assert len(set(ref["soup"][0])) > 2  # the soup's documents differ (else the order would not be checked)
    count_scored(monkeypatch, stop_at="greedy")  # stopped at the greedy soup's first trial
    out, options = tmp_path / "best", dict(lm_eval_tasks="count_mc,noisy=3", lm_eval_include=tasks, budget=0,
                                           device="cpu", progress=False, resume=True)
    with pytest.raises(RuntimeError, match="stopped"):
        tuning.tune(experts, out, **options)
    (journal,) = tmp_path.glob(".*/.ame-tune-journal/scores.jsonl")
    recorded = {e["key"]: e for e in map(json.loads, journal.read_text().splitlines())}
    assert recorded["val ingredient 0"]["each"] == ref["e0"] and recorded["val ingredient 1"]["each"] == ref["e1"]
    assert recorded["val candidate 0"]["each"] == ref["soup"]

    count_scored(monkeypatch)  # no stop now
    seen = _seen(monkeypatch)
    result = tuning.tune(experts, out, **options)
    by_label = {c.label: c for c in result.candidates}
    soup_label = next(c.label for c in result.candidates if c.config is not None and c.config.is_soup and not c.kept)
    for label, name in ((next(k for k in by_label if k.startswith("ingredient 0")), "e0"),
                        (next(k for k in by_label if k.startswith("ingredient 1")), "e1"), (soup_label, "soup")):
        assert seen[label] == ref[name], label
        num, den = seen[label]
        # Their weighted mean is the score tune reports: lm-eval's task scores weighted 1 and 3.
        assert sum(num) / sum(den) == pytest.approx(by_label[label].score, rel=1e-12, abs=1e-15)
    kept = json.loads((out / RESULTS_FILE).read_text())["results"]
    assert result.best.score == pytest.approx((kept["count_mc"]["acc,none"] + 3 * kept["noisy"]["acc,none"]) / 4)


def test_a_lead_within_noise_keeps_the_soup_and_best_takes_it(noisy, tmp_path):
    """On `noisy` ingredient 0 leads the soup by 1/15 (3 documents won, 2 lost): the best validation score, so
    `selection="best"` picks it; guarded, its lower bound is below 0 and the soup is kept. The card's lead and error
    are `paired_lead` of lm-eval's own per-document values of the two written models."""
    experts, soup, tasks = noisy
    options = dict(lm_eval_tasks="noisy", lm_eval_include=tasks, budget=0, device="cpu", progress=False)
    (tmp_path / "best").mkdir()
    (tmp_path / "guarded").mkdir()  # both outputs named `out`: the cards name the folder
    best = tuning.tune(experts, tmp_path / "best" / "out", selection="best", **options)
    assert best.best.score == pytest.approx(13 / 15) and 0 in (best.best.ingredient, *(best.best.kept or ()))
    guarded = tuning.tune(experts, tmp_path / "guarded" / "out", **options)
    assert guarded.best.config is not None and guarded.best.config.is_soup and guarded.best.kept is None
    assert guarded.best.score == pytest.approx(12 / 15)
    e0, ours = samples(experts[0], tasks, ["noisy"])["noisy"], samples(soup, tasks, ["noisy"])["noisy"]
    assert sum(a > b for a, b in zip(e0, ours)) == WON and sum(a < b for a, b in zip(e0, ours)) == LOST
    lead = paired_lead(([*e0], [1.0] * len(e0)), ([*ours], [1.0] * len(ours)), higher=True)
    assert lead.lead > 0 > lead.bound
    why = ModelCard.load(guarded.path / "README.md").text.split("## Why this pick")[1]
    assert "The soup: no candidate beats it on validation beyond noise" in why
    assert f"leads by {lead.lead:.4f} ± {lead.se:.4f} (standard error)" in why
    assert json.loads((guarded.path / RESULTS_FILE).read_text())["results"]["noisy"]["acc,none"] == 12 / 15


def test_a_clear_lead_is_picked_and_the_card_gives_its_lead_and_bound(noisy, tmp_path):
    """On count_mc ingredient 0 answers every question and the soup misses some: a lead beyond noise, so the guard
    picks it (or the greedy soup that kept it alone), and "Why this pick" gives the lead, its error and its bound as
    `paired_lead` computes them from lm-eval's own per-document values of the two written models."""
    experts, soup, tasks = noisy
    result = tuning.tune(experts, tmp_path / "out", lm_eval_tasks="count_mc", lm_eval_include=tasks, budget=0,
                         device="cpu", progress=False)
    assert 0 in (result.best.ingredient, *(result.best.kept or ())), result.best
    e0, ours = samples(experts[0], tasks, ["count_mc"])["count_mc"], samples(soup, tasks, ["count_mc"])["count_mc"]
    lead = paired_lead((e0, [1.0] * len(e0)), (ours, [1.0] * len(ours)), higher=True)
    assert lead.bound > 0 and lead.lead == pytest.approx(result.best.score - sum(ours) / len(ours))
    why = ModelCard.load(result.path / "README.md").text.split("## Why this pick")[1]
    assert (f"its validation lead over the soup, {lead.lead:.4f} ± {lead.se:.4f} (standard error, paired over the "
            f"examples), has the largest one-sided 95 % lower bound ({lead.bound:.4f}, above 0)") in why


def test_a_metric_lm_eval_does_not_average_falls_back_and_the_card_says_which(noisy, tmp_path):
    """`brier_score`, which lm-eval aggregates over the whole task from each document's (answer, probabilities): no
    per-example scores, the best validation score is kept, and "Why this pick" names the task and the metric; the
    reason survives a resume's journal. (Not `mcc`, `f1` or a median: lm-eval bootstraps their stderr 100000 times
    in a forked pool on every run, minutes each, and a fork of a process with threads may hang.)"""
    experts, _, tasks = noisy
    rows = [json.loads(line) for line in (tasks / "noisy.jsonl").read_text().splitlines()]
    (tmp_path / "tasks").mkdir()  # a folder of its own: lm-eval's task index of `tasks` is kept by the process
    _task(tmp_path / "tasks", "noisy_brier", rows, metric="brier_score", aggregation="brier_score")
    result = tuning.tune(experts, tmp_path / "out", lm_eval_tasks="noisy_brier", lm_eval_include=tmp_path / "tasks",
                         lm_eval_metric="brier_score", budget=0, device="cpu", progress=False)
    assert result.metric == "brier_score,none" and result.best.score == result.candidates[0].score
    why = ModelCard.load(result.path / "README.md").text.split("## Why this pick")[1]
    assert ("The best validation score: lm-eval task noisy_brier aggregates brier_score,none by brier_score, not as "
            "the mean of its documents' values, so the guard against validation noise cannot apply.") in why
    line = "lm-eval task noisy_brier aggregates brier_score,none by brier_score"
    ScoreJournal(tmp_path, {"k": 1})("val candidate 0", lambda: 0.5, each=lambda: (True, line))
    assert ScoreJournal(tmp_path, {"k": 1}).each["val candidate 0"] == line


@pytest.mark.parametrize("metric, listed, why", [
    ("mcc,none", [{"metric": "mcc", "aggregation": "matthews_corrcoef"}], "aggregates mcc,none by matthews_corrcoef"),
    ("f1,none", [{"metric": "f1"}], "aggregates f1,none by f1"),  # lm-eval's default aggregation of f1
    ("word_perplexity,none", None, "aggregates word_perplexity,none by weighted_perplexity"),  # output_type default
    ("acc,none", [{"metric": "acc", "aggregation": "mean"}], "its per-document acc,none do not average to its"),
    ("exact_match,none", [{"metric": "exact_match", "aggregation": "mean"}], "logged no per-document exact_match"),
])
def test_which_lm_eval_metrics_give_per_document_scores(metric, listed, why):
    """lm-eval's output as its evaluator returns it (`configs`, `results`, `samples`), for metrics whose aggregation
    is not a mean (named from the task's `metric_list`, else lm-eval's default for the metric), per-document values
    that do not make the reported score, and no samples: a line naming the task and the metric, no scores."""
    from ame_hf._lm_eval_examples import per_document

    name = metric.split(",")[0]
    rows = [{"doc_id": i, "filter": "none", name: float(i % 2)} for i in range(4)]
    out = {"configs": {"t": {"metric_list": listed} if listed is not None else {}},
           "results": {"t": {metric: 0.75}}, "samples": {} if name == "exact_match" else {"t": rows}}
    got = per_document(out, (("t", 1.0),), metric, {})
    assert isinstance(got, str) and got.startswith("lm-eval task t") and why in got, got


@pytest.mark.parametrize("by_size", [True, False])
def test_a_groups_documents_are_weighted_as_lm_eval_weights_its_tasks(by_size):
    """A group of tasks a (4 documents) and b (2), named with task c (2 documents) at weight 3: a group's score is
    its tasks' scores weighted by their sizes (lm-eval's default) or not, and the per-document scores' weighted mean
    is the combined score `tune` reports (from lm-eval's reported scores, as `lm_harness.combined`)."""
    from types import SimpleNamespace

    from ame_hf._lm_eval_examples import per_document
    from ame_hf.lm_harness import LmEvalTasks, combined

    values = {"a": [1.0, 0.0, 0.0, 0.0], "b": [1.0, 1.0], "c": [0.0, 1.0]}
    out = {"configs": {t: {"metric_list": [{"metric": "acc", "aggregation": "mean"}]} for t in values},
           "group_subtasks": {"g": ["a", "b"]},
           "results": {t: {"acc,none": sum(v) / len(v), "sample_len": len(v)} for t, v in values.items()},
           "samples": {t: [{"doc_id": i, "filter": "none", "acc": x} for i, x in enumerate(v)] for t, v in values.items()}}
    sizes = (4, 2) if by_size else (1, 1)
    out["results"]["g"] = {"acc,none": (0.25 * sizes[0] + 1.0 * sizes[1]) / sum(sizes)}  # lm-eval's group score
    index = {"g": SimpleNamespace(cfg={"aggregate_metric_list": [{"metric": "acc", "weight_by_size": by_size}]})}
    num, den = per_document(out, (("g", 1.0), ("c", 3.0)), "acc,none", index)
    assert [n / d for n, d in zip(num, den)] == values["a"] + values["b"] + values["c"]
    # A document's weight: (the task's share of the score) / (its documents), the weights summing to 8 documents.
    share = {"a": sizes[0] / sum(sizes) / 4, "b": sizes[1] / sum(sizes) / 2, "c": 3.0 / 2}
    expected = [share[t] / 4 * 8 for t in values for _ in values[t]]
    assert den == pytest.approx(expected, rel=1e-15) and sum(den) == pytest.approx(8)
    spec = LmEvalTasks(tasks=(("g", 1.0), ("c", 3.0)))
    assert sum(num) / sum(den) == pytest.approx(combined({t: out["results"][t]["acc,none"] for t in "gc"}, spec))
    del index["g"].cfg["aggregate_metric_list"][0]["metric"]
    assert per_document(out, (("g", 1.0),), "acc,none", index).startswith("lm-eval group g: its aggregation of")
