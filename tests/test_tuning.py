"""`tune` (ame_hf/tuning.py) and the selection rules (ame_hf/selection.py) offline on tiny text classifiers and
the demo's tiny GPT-2s: the best validation score wins, direction-aware (a loss picks the minimum; ties go to
the soup, then the greedy soup, then AME, then an ingredient), the written output is the selected candidate,
the greedy soup keeps exactly the ingredients that do not make it worse, held-out `--test-data` goes into the
card, the default budget explores, a task that does not fit is refused before any merge, and PEFT adapters are
ingredients (`--base`): scored once each as their merge into their base, written as that full model when selected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

import ame_hf.in_memory as in_memory
import ame_hf.tuning as tuning
from ame_hf import AmeConfig, InvalidConfigError, merge
from ame_hf.cli import main
from ame_hf.evaluation import evaluate_model, load_data
from ame_hf.recipe import read_recipe
from factories import LM_LORAS, assert_one_error_line, cli_error_line, load_state, make_lora_adapter, score_table


def test_tune_never_loses_to_soup_or_ingredients(classifiers, tmp_path, capsys):
    experts, val = classifiers
    out = tmp_path / "best"
    assert main(["tune", *map(str, experts), "--out", str(out), "--data", str(val), "--budget", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    table, selected = printed.split("\nselected: ")
    scores = score_table(table)
    assert len(scores) == 3 + 2 + 3  # ingredients, soup and greedy soup, budget
    label = selected.split(" (validation ")[0]
    # The selection rule: the candidate named on the `selected:` line has the best score of all candidates,
    # so it is never worse than the soup or any single ingredient.
    assert scores[label] == max(scores.values()), (label, scores)
    assert scores["soup"] <= scores[label] and all(scores[k] <= scores[label] for k in scores if k.startswith("ingredient"))
    # The written model is that candidate: the ingredient itself, or what a fresh merge with its config gives.
    if label.startswith("ingredient "):
        expected = load_state(experts[int(label.split()[1].rstrip(":"))])
    elif label.startswith("greedy soup"):
        kept = [int(k) for k in label.split("kept ")[1].rstrip(")").split(", ")]
        expected = load_state(experts[kept[0]] if len(kept) == 1 else
                              merge([experts[k] for k in kept], tmp_path / "fresh", AmeConfig.soup(), progress=False).path)
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
    """With scores fixed by candidate (the third merge wins), the output holds exactly that merge's weights (the
    candidates are built in memory: only the winner is written, by merge)."""
    experts, val = berts
    soup, *grid = [AmeConfig.soup(), *tuning.default_grid()[:2]]
    winner = load_state(merge(experts, tmp_path / "winner", grid[1], progress=False).path)

    def score(model, data, task, metric=None, **kw):
        state = model.state_dict() if hasattr(model, "state_dict") else load_state(Path(model))
        return 0.9 if all(k in state and torch.equal(state[k], v) for k, v in winner.items()) else 0.5

    monkeypatch.setattr(tuning, "evaluate_model", score)
    result = tuning.tune(experts, tmp_path / "best", data=val, budget=2, progress=False)
    assert len(result.candidates) == 2 + 4 and result.best.score == max(c.score for c in result.candidates) == 0.9
    assert result.best.label == tuning._label(grid[1]) and result.best.config is not None
    written = load_state(result.path)
    expected = load_state(merge(experts, tmp_path / "fresh", grid[1], progress=False).path)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    other = load_state(merge(experts, tmp_path / "soup", soup, progress=False).path)  # so the check can fail
    assert not all(torch.equal(written[k], other[k]) for k in other)


def test_output_options_reach_every_merge_and_weight_options_are_refused(berts, tmp_path, monkeypatch):
    """`config=` (and `--max-shard-size` etc. on `ame-hf tune`) is passed to the soup, every AME variant and the
    greedy soup's merges; the winning merge is written with it. Options that decide the weights are refused in
    one line naming the keyword, before anything is read."""
    import ame_hf.selection as selection

    experts, val = berts
    used: list[AmeConfig] = []

    def recording(merge_fn):
        def run(refs, out, config=None, **kwargs):
            used.append(config)
            return merge_fn(refs, out, config, **kwargs)
        return run

    monkeypatch.setattr(tuning, "merge", recording(tuning.merge))
    monkeypatch.setattr(tuning, "merge_model", lambda refs, config, *a, **kw: used.append(config) or  # in memory
                        in_memory.merge_model(refs, config, *a, **kw))
    monkeypatch.setattr(selection, "merge", recording(selection.merge))
    monkeypatch.setattr(selection, "merge_model", lambda refs, config, *a, **kw: used.append(config) or  # in memory
                        in_memory.merge_model(refs, config, *a, **kw))
    _fixed_scores(monkeypatch, lambda path: 0.9 if "cand1" in path else 0.5)
    result = tuning.tune(experts, tmp_path / "best", data=val, budget=1, progress=False,
                         config=AmeConfig(max_shard_size="8KB", compute_dtype="float64"))
    # Soup and one variant (in memory), the greedy soup's trials, the pick written by merge.
    assert len(used) == 2 + len(experts) - 1 + 1
    assert all(c.max_shard_size == "8KB" and c.compute_dtype == "float64" for c in used), used
    assert result.best.label == tuning._label(tuning.default_grid()[0])
    assert (result.path / "model.safetensors.index.json").is_file()  # written in 8KB shards
    expected = load_state(merge(experts, tmp_path / "fresh", tuning.default_grid()[0], compute_dtype="float64",
                                progress=False).path)
    written = load_state(result.path)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    for bad, field in ((AmeConfig(optimizer="sgd"), "optimizer"), (AmeConfig(relative_lr=0.1), "relative_lr")):
        with pytest.raises(InvalidConfigError, match=f"drop {field}") as caught:
            tuning.tune(experts, tmp_path / "never", data=val, config=bad)
        assert caught.value.field == field and "--" not in str(caught.value)
    with pytest.raises(InvalidConfigError, match="base"):
        tuning.tune(experts, tmp_path / "never", data=val, base="org/one", config=AmeConfig(base="org/other"))
    assert not (tmp_path / "never").exists()


def test_ties_go_to_the_soup_then_greedy_then_ame_then_an_ingredient():
    from ame_hf.selection import Candidate, best_candidate

    greedy = Candidate("greedy", 0.9, config=AmeConfig.soup(), kept=[0, 1])
    cands = [Candidate("ingredient 0", 0.9, ingredient=0), Candidate("adam", 0.9, config=AmeConfig()),
             greedy, Candidate("soup", 0.9, config=AmeConfig.soup()), Candidate("ingredient 1", 0.8, ingredient=1)]
    assert best_candidate(cands, "accuracy").label == "soup"
    assert best_candidate(cands[:3], "accuracy").label == "greedy"
    assert best_candidate(cands[:2], "accuracy").label == "adam"
    assert best_candidate(cands[4:] + cands[:1], "accuracy").label == "ingredient 0"  # higher score wins
    # A greedy soup that kept one ingredient is that ingredient: the tie goes to the ingredient's own row.
    one = Candidate("greedy soup (kept 0)", 0.9, ingredient=0, kept=[0])
    assert best_candidate([cands[0], one], "accuracy").label == "ingredient 0"


def test_a_loss_metric_picks_the_minimum_and_accuracy_the_maximum():
    from ame_hf.selection import Candidate, best_candidate, ranked

    cands = [Candidate("a", 2.0, ingredient=0), Candidate("b", 1.5, ingredient=1), Candidate("c", 3.0, ingredient=2)]
    assert best_candidate(cands, "loss").label == "b" and best_candidate(cands, "perplexity").label == "b"
    assert best_candidate(cands, "accuracy").label == "c"
    assert [c.label for c in ranked(cands, "loss")] == ["b", "a", "c"]
    assert [c.label for c in ranked(cands, "accuracy")] == ["c", "a", "b"]


def _fixed_scores(monkeypatch, scores):
    """Validation scores fixed by model folder: `scores(path) -> float` for ingredients and merges alike."""
    monkeypatch.setattr(tuning, "evaluate_model", lambda model, data, task, metric=None, **kw: scores(_name(model)))


def _name(model) -> str:
    """A model folder's path; a candidate built in memory is named like the folder it would have had (`cand{n}`)."""
    return str(getattr(model, "ame_candidate", model))


@pytest.mark.parametrize("metric, best_value, other", [("accuracy", 0.99, 0.5), ("loss", 0.1, 2.0)])
def test_an_ingredient_that_is_best_is_picked_whatever_the_direction(berts, tmp_path, monkeypatch, metric,
                                                                      best_value, other):
    """Ingredient 1 scores best (highest accuracy, lowest loss) and every merge worse: the output is it, byte for byte."""
    experts, val = berts
    _fixed_scores(monkeypatch, lambda path: best_value if path == str(experts[1]) else other)
    result = tuning.tune(experts, tmp_path / "best", data=val, metric=metric, budget=2, progress=False)
    assert result.best.ingredient == 1 and result.best.label.startswith("ingredient 1") and result.metric == metric
    assert result.candidates[0] is result.best
    written, expected = load_state(result.path), load_state(experts[1])
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    # The opposite direction turns the same scores around: now a merge (worse for the first metric) wins.
    flipped = "loss" if metric == "accuracy" else "accuracy"
    again = tuning.tune(experts, tmp_path / "flip", data=val, metric=flipped, budget=2, progress=False)
    assert again.best.ingredient != 1 and again.best.score == other


def test_each_model_is_scored_on_the_test_data_once(berts, tmp_path, monkeypatch):
    """Ingredient 1 is best on validation, kept alone by the greedy soup and selected: it is the greedy soup,
    the best ingredient and the selection at once, so the test data scores two models (it and the soup)."""
    experts, val = berts
    test = load_data(val, "text-classification")
    on_test: list[str] = []

    def score(model, data, task, metric=None, **kw):
        if data is test:
            on_test.append(str(model))
        return 0.99 if str(model) == str(experts[1]) else 0.5

    monkeypatch.setattr(tuning, "evaluate_model", score)
    result = tuning.tune(experts, tmp_path / "best", data=val, test_data=test, budget=1, progress=False)
    assert result.best.ingredient == 1
    assert sorted(result.test_scores) == ["best ingredient", "greedy soup", "selected", "soup"]
    assert len(on_test) == 2 and on_test.count(str(experts[1])) == 1, on_test
    assert result.test_scores["selected"] == result.test_scores["greedy soup"] == 0.99


def test_a_tune_output_that_copies_an_ingredient_is_ame_hfs_own(classifiers, tmp_path, capsys):
    """It may be replaced by `--overwrite` and pushed, and `merge --config` explains it is no merge."""
    from ame_hf.output import check_output_dir
    from ame_hf.records import Ingredient
    from ame_hf.choosing import copy_ingredient

    experts, _ = classifiers
    copy = copy_ingredient(tmp_path / "copy", Ingredient(ref=str(experts[0]), path=experts[0]), ["a", "b"], 5)
    check_output_dir(copy, overwrite=True)  # a previous ame-hf output: may be replaced
    capsys.readouterr()
    code = main(["merge", "--config", str(copy / "ame_config.yaml"), "--out", str(tmp_path / "o")])
    assert_one_error_line(code, capsys.readouterr().err, "not a merge", str(experts[0]), exit_code=2)


def test_tune_refuses_a_task_that_does_not_fit_before_any_merge(llamas, berts, tmp_path, monkeypatch, capsys):
    def no_merge(*args, **kwargs):
        raise AssertionError("merged before checking the task")

    monkeypatch.setattr(tuning, "merge", no_merge)
    bert_dirs, val = berts
    capsys.readouterr()
    # Inferred text-generation: these causal LMs have no tokenizer to score text with.
    code = main(["tune", *map(str, llamas), "--out", str(tmp_path / "o"), "--data", str(val)])
    assert_one_error_line(code, capsys.readouterr().err, "no tokenizer files", "text-generation", exit_code=1)
    code = main(["tune", *map(str, llamas), "--out", str(tmp_path / "o"), "--data", str(val),
                 "--task", "text-classification"])
    err = capsys.readouterr().err
    assert code == 1 and "LlamaForCausalLM, which cannot do text-classification" in err, err
    code = main(["tune", *map(str, bert_dirs), "--out", str(tmp_path / "o"), "--data", str(val),
                 "--task", "text-generation"])
    assert_one_error_line(code, capsys.readouterr().err, "BertForSequenceClassification, which cannot do "
                          "text-generation", exit_code=1)
    assert not (tmp_path / "o").exists()


# -- the greedy soup -----------------------------------------------------------------------------

def _distance_scores(experts, target):
    """A validation "loss" whose effect we control: the distance of a model's weights to `target`."""
    def score(model) -> float:  # a folder, or a candidate built in memory
        state = model.state_dict() if hasattr(model, "state_dict") else load_state(model)
        return float(sum(((state[k].double() - target[k]) ** 2).sum() for k in target) ** 0.5)
    return score


def test_greedy_soup_keeps_exactly_the_ingredients_that_do_not_make_it_worse(lm_experts, tmp_path, monkeypatch):
    """Scored by distance to the mean of ingredients 0 and 2: the sorted walk keeps 0 and 2 (the soup of the two
    is the target), and rejects 1. The output is the real soup of 0 and 2 with its ame_config.yaml and card."""
    import ame_hf.selection as selection

    experts, val, _ = lm_experts
    states = [load_state(e) for e in experts]
    target = {k: (states[0][k].double() + states[2][k].double()) / 2 for k in states[0] if states[0][k].is_floating_point()}
    score = _distance_scores(experts, target)
    # (its trials are scored as models built in memory, the ingredients by folder)
    monkeypatch.setattr(selection, "evaluate_model", lambda model, data, task, metric=None, **kw: score(
        model if hasattr(model, "state_dict") else str(model)))
    result = selection.greedy_soup(experts, tmp_path / "greedy", data=val, metric="loss")
    assert result.kept == [0, 2]
    assert [(i, ok) for i, _, ok in result.steps][1:] == [(2 if result.steps[0][0] == 0 else 0, True), (1, False)]
    assert result.score == pytest.approx(0.0, abs=1e-5) and len(result.ingredient_scores) == 3
    written = load_state(result.path)
    expected = load_state(merge([experts[0], experts[2]], tmp_path / "fresh", AmeConfig.soup(), progress=False).path)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    run = AmeConfig.from_dict(read_recipe(result.path / "ame_config.yaml").values)
    assert run.is_soup and len(__import__("yaml").safe_load((result.path / "ame_config.yaml").read_text())["ingredients"]) == 2
    card = ModelCard.load(result.path / "README.md")
    assert "## Greedy soup" in card.text and "kept **2 of 3**" in card.text and "rejected (worse)" in card.text
    assert "selected by the greedy soup" in card.text and "lower is better" in card.text


def test_greedy_soup_with_accuracy_rejects_what_lowers_it_and_can_keep_one(lm_experts, tmp_path, monkeypatch):
    """Higher is better now: the score is minus the distance to ingredient 1 alone, so every soup is worse than
    ingredient 1 and only it is kept; with a loss the same numbers keep every soup that lowers them."""
    from ame_hf.selection import run_greedy_soup

    experts, val, _ = lm_experts
    target = {k: v.double() for k, v in load_state(experts[1]).items() if v.is_floating_point()}
    score = _distance_scores(experts, target)
    refs = [str(e) for e in experts]
    scores = [-score(r) for r in refs]
    trace = run_greedy_soup(refs, scores, lambda p: -score(str(p)), "accuracy", tmp_path / "s1", "m")
    assert trace.kept == [1] and [ok for _, _, ok in trace.steps] == [True, False, False] and trace.path is None
    assert not any((tmp_path / "s1").rglob("*.safetensors"))  # rejected trials are not kept on disk
    # As a loss the same numbers rank the other way: the walk starts from the lowest (the farthest from
    # ingredient 1), and each soup raises the number, so it is rejected.
    trace = run_greedy_soup(refs, scores, lambda p: -score(str(p)), "loss", tmp_path / "s2", "m")
    lowest = min(range(3), key=lambda i: scores[i])
    assert lowest != 1 and trace.kept == [lowest] and [ok for _, _, ok in trace.steps] == [True, False, False]


def test_merge_greedy_soup_cli_refuses_weight_options_and_needs_eval_data(lm_experts, tmp_path, capsys):
    experts, val, _ = lm_experts
    code = main(["merge", *map(str, experts), "--out", str(tmp_path / "g"), "--greedy-soup"])
    assert_one_error_line(code, capsys.readouterr().err, "--greedy-soup needs --eval-data", exit_code=2)
    code = main(["merge", *map(str, experts), "--out", str(tmp_path / "g"), "--greedy-soup", "--eval-data", str(val),
                 "--optimizer", "adam"])
    assert_one_error_line(code, capsys.readouterr().err, "drop --optimizer", exit_code=2)
    assert not (tmp_path / "g").exists()


# -- tune on causal LMs, with held-out test data -------------------------------------------------

def test_tune_text_generation_with_test_data(lm_experts, tmp_path, capsys):
    """The real thing on the demo's GPT-2s: loss is minimised, the greedy soup is a candidate, the time per
    candidate is announced, and the card's model-index holds the held-out test loss of the selected model."""
    experts, val, test = lm_experts
    out = tmp_path / "best"
    code = main(["tune", *map(str, experts), "--out", str(out), "--data", str(val), "--test-data", str(test),
                 "--budget", "2", "--max-length", "12"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "s per candidate" in captured.err
    table, selected = captured.out.split("\nselected: ")
    assert "loss (lower is better)" in table and "perplexity" in table
    scores = score_table(table)
    assert len(scores) == 3 + 2 + 2 and any(k.startswith("greedy soup (kept") for k in scores)
    label = selected.split(" (validation ")[0]
    card = ModelCard.load(out / "README.md")
    # The default (guarded) selection: the candidate whose lead over the soup is surest (never worse than the soup on
    # validation), or the soup when no lead is beyond validation noise; the card says which and why.
    why = card.text.split("## Why this pick")[1]
    assert scores[label] <= scores["soup"] and label in why, (label, why)
    assert (label == "soup") == ("no candidate beats it" in why)
    results = card.data.eval_results
    assert results[0].dataset_split == "test" and results[0].metric_type == "loss" and results[0].dataset_name == "test"
    assert results[1].metric_type == "perplexity" and "not used for the selection" in results[0].metric_name
    assert f"from {3 + 2 + 2} candidates" in card.text and "no part in the choice" in card.text
    data = load_data(test, "text-generation")
    assert evaluate_model(str(out), data, "text-generation", max_length=12) == pytest.approx(results[0].metric_value, abs=1e-6)


def test_the_default_budget_explores():
    """The first 12 candidates span optimizers, steps up to relative lr 1, pivots, orders and epochs."""
    grid = tuning.default_grid()[:tuning.DEFAULT_BUDGET]
    assert {c.optimizer for c in grid} == {"adam", "adagrad", "rmsprop", "sgd"}
    assert any(c.optimizer == "sgd" and c.optimizer_args.get("momentum") for c in grid)
    rel = [c.relative_lr for c in grid if c.relative_lr is not None]
    assert min(rel) <= 0.02 and max(rel) == 1.0
    assert {c.pivot for c in grid} == {"mean", "first"} and {c.epochs for c in grid} == {1, 3}
    assert {c.order for c in grid if not c.shuffle} == {"given", "reverse"} and any(c.shuffle for c in grid)
    labels = [tuning._label(c) for c in tuning.default_grid()]
    assert len(set(labels)) == len(labels) and not any(c.is_soup for c in tuning.default_grid())


# -- PEFT LoRA adapters as ingredients -----------------------------------------------------------

def test_a_selected_adapter_is_written_as_its_full_merge_and_each_ingredient_scored_once(lm_adapters, tmp_path,
                                                                                        monkeypatch, capsys):
    """Scored by closeness to adapter 1's merge_and_unload() weights, adapter 1 is best and every merge worse:
    the output is the full model (loadable by transformers, no adapter files) with exactly those weights. Each
    ingredient is evaluated once on the validation data; the greedy soup selects the same way."""
    import yaml
    from transformers import AutoModelForCausalLM

    import ame_hf.selection as selection

    adapters, full, val = lm_adapters["adapters"], lm_adapters["full"], lm_adapters["val"]
    reference = load_state(lm_adapters["references"][1])
    distance = _distance_scores(None, {k: v.double() for k, v in reference.items()})
    calls = []

    def score(model, data, task, metric=None, **kw):
        calls.append((_name(model), data.name))
        return distance(model if hasattr(model, "state_dict") else str(model))  # a "loss": adapter 1 alone is 0

    monkeypatch.setattr(tuning, "evaluate_model", score)
    ingredients = [adapters[0], adapters[1], full]
    test = tmp_path / "test.txt"
    test.write_text(val.read_text())
    result = tuning.tune(ingredients, tmp_path / "best", data=val, test_data=test, budget=1, progress=False)
    assert result.best.ingredient == 1 and result.best.label.startswith("ingredient 1")
    # An L2 norm over every weight: float32 rounding of the delta (summed in a fixed rank order, DESIGN §1) against
    # peft's matrix product leaves ~1e-8 per element; the element-wise comparison below holds at 1e-6.
    # + task arithmetic and TIES from the adapters' base (tuning.base_grid)
    assert len(result.candidates) == 3 + 2 + 1 + 4 and result.test_scores["best ingredient"] == pytest.approx(0, abs=1e-5)
    validation = [path for path, name in calls if name == "val"]
    assert len(validation) == 3 + 1 + 2 + 1 + 4  # ingredients, soup, greedy soup trials, AME: each evaluated once
    assert [Path(p).name for p in validation[:2]] == ["model0", "model1"] and validation[2] == str(full)
    assert not any("/ingredients/" in p or p == str(full) for p in validation[3:])
    out = result.path
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, value in model.state_dict().items():
        assert torch.allclose(value, reference[name], atol=1e-6), name
    card = ModelCard.load(out / "README.md")
    assert "merged into its base" in card.text and "merge_and_unload" in card.text
    marker = yaml.safe_load((out / "ame_config.yaml").read_text())
    assert marker["selected_ingredient"] == str(adapters[1]) and marker["selected_base"] == str(lm_adapters["base"])
    cli_error_line(capsys, "merge", "--config", out / "ame_config.yaml", "--out", tmp_path / "o",
                   needles=["not a merge", "PEFT adapter"], exit_code=2)
    assert not list(tmp_path.glob(".ame-tmp-*"))
    # The greedy soup (merge --greedy-soup's Python side): no soup beats adapter 1, so it is written the same way.
    monkeypatch.setattr(selection, "evaluate_model", score)
    greedy = selection.greedy_soup(ingredients, tmp_path / "greedy", data=val)
    assert greedy.kept == [1] and not (greedy.path / "adapter_config.json").exists()
    written = load_state(greedy.path)
    assert all(torch.allclose(written[k], reference[k], atol=1e-6) for k in reference)


def test_tune_cli_over_adapters_with_base(lm_adapters, tmp_path, capsys):
    """Adapters that name no base: `ame-hf tune` says so in one line before any work, and with `--base` it
    scores and merges them (soup, greedy soup, AME) for real; the output scores what the table says."""
    base, val = lm_adapters["base"], lm_adapters["val"]
    orphans = [make_lora_adapter(base, tmp_path / f"orphan{i}", o, seed=i, base_name=None, scale=0.3)
               for i, o in enumerate(LM_LORAS)]
    refs = [*orphans, lm_adapters["full"]]
    cli_error_line(capsys, "tune", *refs, "--out", tmp_path / "o", "--data", val,
                   needles=[str(orphans[0]), "names no base model", "--base"], exit_code=1)
    assert not (tmp_path / "o").exists()
    code = main(["tune", *map(str, refs), "--out", str(tmp_path / "o"), "--data", str(val), "--budget", "1",
                 "--base", str(base), "--quiet", "--selection", "best"])  # the best validation score, whatever the noise
    captured = capsys.readouterr()
    assert code == 0, captured.err
    table, selected = captured.out.split("\nselected: ")
    scores = score_table(table)
    assert len(scores) == 3 + 2 + 1 + 4  # + task arithmetic and TIES from the base
    label = selected.split(" (validation ")[0]
    assert scores[label] == min(scores.values())
    data = load_data(val, "text-generation")
    assert evaluate_model(str(tmp_path / "o"), data, "text-generation") == pytest.approx(scores[label], abs=1e-4)
    assert not (tmp_path / "o" / "adapter_config.json").exists()


def test_every_output_kind_reproduces_its_weights_from_its_ame_config(berts, lm_experts, tmp_path, monkeypatch):
    """Issue 23 item 1: a tune pick (an AME merge and the greedy soup) and the greedy soup's output record local
    ingredients relative to the output folder, not to the scratch folder they were merged in, so
    `merge --config OUT/ame_config.yaml` gives the same weights (it said 'no such local directory')."""
    import ame_hf.selection as selection
    from factories import weights_sha256

    experts, val = berts
    outputs = []
    monkeypatch.setattr(tuning, "evaluate_model",  # an AME variant wins
                        lambda model, data, task, metric=None, **kw: 0.9 if "cand2" in _name(model) else 0.5)
    outputs.append(tuning.tune(experts, tmp_path / "ame-pick", data=val, budget=2, progress=False).path)
    monkeypatch.setattr(tuning, "evaluate_model",  # the greedy soup wins (it is scored in a "greedy" folder)
                        lambda model, data, task, metric=None, **kw: 0.9 if "greedy" in _name(model) else 0.5)
    picked = tuning.tune(experts, tmp_path / "gpick", data=val, budget=1, progress=False)
    assert picked.best.label.startswith("greedy soup") and picked.best.config is not None, picked.best
    outputs.append(picked.path)
    lm, lm_val, _ = lm_experts
    monkeypatch.setattr(selection, "evaluate_model", lambda model, data, task, metric=None, **kw: 1.0)
    outputs.append(selection.greedy_soup(lm, tmp_path / "greedy", data=lm_val, metric="loss").path)
    for out in outputs:
        again = tmp_path / f"{out.name}-again"
        assert main(["merge", "--config", str(out / "ame_config.yaml"), "--out", str(again), "--quiet"]) == 0, out
        assert weights_sha256(again) == weights_sha256(out), out
        card = ModelCard.load(out / "README.md").text  # its YAML block is the file's text
        assert (out / "ame_config.yaml").read_text().split("ame_hf_version")[0] in card, out


def test_with_a_known_base_tune_tries_task_arithmetic_and_ties(berts, tmp_path):
    """Issue 26: with `base=`, the candidates include task arithmetic and TIES from the base, labelled as such, each
    the AME configuration that computes it (one sgd step from the base over all ingredients)."""
    from factories import save_base

    experts, val = berts
    base = save_base(tmp_path / "base", kind="bert")  # the base the fine-tunes were perturbed from
    result = tuning.tune(experts, tmp_path / "best", data=val, base=str(base), budget=1, progress=False)
    labels = [c.label for c in result.candidates]
    assert len(labels) == 2 + 2 + 1 + 4
    known = {c.label: c.config for c in result.candidates if "from the base" in c.label}
    assert sorted(known) == sorted(["task arithmetic, scale 1.5 (one sgd step from the base)",
                                    "task arithmetic, scale 2 (one sgd step from the base)",
                                    "TIES density 0.2, scale 1 (one sgd step from the base)",
                                    "TIES density 0.5, scale 1 (one sgd step from the base)"])
    assert all(c.pivot == "base" and c.batch_size == 2 and c.optimizer == "sgd" for c in known.values())
    assert {c.transform for c in known.values()} == {"none", "ties"}
    assert all(0 <= c.score <= 1 for c in result.candidates)  # each merged and scored
