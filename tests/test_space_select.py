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


def test_the_form_reaches_tune_with_the_librarys_defaults(monkeypatch, tmp_path):
    """Blank boxes are the library's defaults: task inferred, the task's metric, DEFAULT_BUDGET, no test data."""
    import gradio as gr

    from ame_hf.space import build_app
    from ame_hf.space_select import run_tune
    from ame_hf.tuning import DEFAULT_BUDGET

    seen = {}

    def fake_tune(refs, out, **kwargs):
        seen.update(kwargs, refs=refs, out=out)
        raise ame_hf.InvalidConfigError("stop here")

    monkeypatch.setattr(ame_hf, "tune", fake_tune)
    data = tmp_path / "val.jsonl"
    data.write_text('{"text": "red", "label": 0}\n')
    with pytest.raises(ame_hf.InvalidConfigError, match="stop here"):
        run_tune(" org/a\n\norg/b@v1 ", str(data), None, tmp_path, task="auto", metric="", budget=None, max_length=0)
    assert seen["refs"] == ["org/a", "org/b@v1"] and seen["out"] == tmp_path / "merged"
    assert (seen["task"], seen["metric"], seen["budget"], seen["max_length"], seen["test_data"]) == (
        None, None, DEFAULT_BUDGET, None, None)
    demo = build_app()
    budget = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "budget")
    assert isinstance(budget, gr.Number) and budget.value == DEFAULT_BUDGET


def test_a_tuned_model_replaces_the_merge_and_is_pushed_by_push(classifiers, hub, hub_token, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from ame_hf.space import build_app

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the app's per-run work directories
    experts, val = classifiers
    demo = build_app()
    _, _, _, previous = handler(demo, "merge")("\n".join(map(str, experts[:2])), "sgd", "", "", 1, "mean", 0, False,
                                               "auto", "auto", "", None)
    summary, candidates, card, config_yaml, folder = handler(demo, "tune")(
        "\n".join(map(str, experts)), str(val), None, "auto", "", 0, None, "", previous)
    assert not Path(previous).parent.exists(), "the merge's work directory outlived the tune that replaced it"
    assert Path(folder).name == "merged" and (Path(folder) / "model.safetensors").is_file()
    assert "Selected **" in summary and "played no part" not in summary  # no test data, no test table
    assert len(markdown_rows(candidates)) == len(experts) + 2

    status = handler(demo, "push")("org/space-tuned", False, hub_token, folder)
    assert status.startswith("Pushed to") and "org/space-tuned" in status
    api = HfApi(endpoint=hub.url, token=hub_token)
    files = {s.rfilename for s in api.model_info("org/space-tuned").siblings}
    assert {"README.md", "ame_config.yaml", "config.json", "model.safetensors"} <= files, files
    readme = Path(api.hf_hub_download("org/space-tuned", "README.md")).read_text(encoding="utf-8")
    assert "ame-hf tune" in readme and summary.split("**")[1] in readme


def _one_line_error(fn, *args) -> str:
    import gradio as gr

    with pytest.raises(gr.Error) as err:
        fn(*args)
    message = str(err.value.message)
    assert message and "\n" not in message, message
    return message


def test_mistakes_are_one_gradio_error_line_and_keep_the_previous_result(classifiers, tmp_path, monkeypatch):
    from ame_hf.space import build_app, one_line

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    experts, val = classifiers
    refs = "\n".join(map(str, experts))
    evaluate, tune = handler(build_app(), "evaluate"), handler(build_app(), "tune")
    assert "upload the data" in _one_line_error(evaluate, refs, None, "auto", "", None, "")
    assert "give at least one model" in _one_line_error(evaluate, " \n", str(val), "auto", "", None, "")
    assert "max length must be a whole number >= 0" in _one_line_error(evaluate, refs, str(val), "auto", "", 2.5, "")
    # A task the models cannot do: the library's own one-line message, before any model runs.
    with pytest.raises(ame_hf.InvalidConfigError) as direct:
        ame_hf.evaluate(experts, data=val, task="text-generation")
    assert _one_line_error(evaluate, refs, str(val), "text-generation", "", None, "") == one_line(direct.value)

    previous = tmp_path / "old" / "merged"
    previous.mkdir(parents=True)
    assert "budget must be a whole number >= 0" in _one_line_error(
        tune, refs, str(val), None, "auto", "", -1, None, "", str(previous))
    assert "upload the validation data" in _one_line_error(tune, refs, None, None, "auto", "", 1, None, "", str(previous))
    assert previous.is_dir() and not list((tmp_path / "tmp").iterdir()), "a failed tune must change nothing"


def test_on_a_public_space_the_data_and_metric_cannot_read_the_servers_disk(classifiers, tmp_path):
    from ame_hf.space import build_app

    experts, val = classifiers
    app = build_app(allow_local_paths=False)
    evaluate, tune = handler(app, "evaluate"), handler(app, "tune")
    assert "local paths are disabled" in _one_line_error(evaluate, str(experts[0]), str(val), "auto", "", None, "")
    assert "local paths are disabled" in _one_line_error(
        tune, f"org/a\n{experts[1]}", str(val), None, "auto", "", 0, None, "", None)
    # Image data names files, which would be read from the server; a metric other than the offline ones
    # would run a script from the Hub or the server's disk.
    images = tmp_path / "images.jsonl"
    images.write_text(json.dumps({"image": "/etc/hostname", "label": 0}) + "\n")
    assert "image files named in the data" in _one_line_error(evaluate, "org/a", str(images), "auto", "", None, "")
    assert "image files named in the data" in _one_line_error(
        tune, "org/a\norg/b", str(val), str(images), "image-classification", "", 0, None, "", None)
    message = _one_line_error(evaluate, "org/a", str(val), "auto", "someone/metric", None, "")
    assert "not available in this app" in message and "accuracy" in message and "macro_f1" in message


def test_the_base_box_reaches_evaluate_and_tune_for_adapters(lm_adapters, tmp_path):
    """An adapter that names no base is scored and tuned with the form's Base box, as the library does with
    `base=`; without it, one error line; on a public Space a local base is refused like any local path."""
    from ame_hf.errors import AmeError
    from ame_hf.space_select import run_evaluate, run_tune
    from factories import LM_LORAS, make_lora_adapter

    base, val = lm_adapters["base"], lm_adapters["val"]
    orphan = make_lora_adapter(base, tmp_path / "orphan", LM_LORAS[0], seed=3, scale=0.3, base_name=None)
    with pytest.raises(AmeError):
        run_evaluate(str(orphan), val)
    got = run_evaluate(str(orphan), val, base=f"  {base}  ")
    want = ame_hf.evaluate([orphan], data=val, base=base)
    assert got.scores[0][1] == pytest.approx(want.scores[0][1], abs=1e-6)
    with pytest.raises(AmeError, match="local paths are disabled"):
        run_evaluate("org/model", val, base=str(base), allow_local_paths=False)
    view = run_tune(f"{orphan}\n{lm_adapters['full']}", val, None, tmp_path / "work", budget=0, base=str(base))
    assert (view.folder / "config.json").is_file() and not (view.folder / "adapter_config.json").exists()


def _stop_evaluate_and_tune(monkeypatch, tmp_path) -> dict:
    """`ame_hf.evaluate` and `ame_hf.tune` record their keywords (in the returned dict, by name) and stop there;
    the Space's temporary folders go under tmp_path/tmp, so a test can see that none was left."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    seen: dict = {}

    def stop(name):
        def run(refs, *args, **kwargs):
            seen[name] = kwargs
            raise ame_hf.InvalidConfigError("stop here")
        return run

    monkeypatch.setattr(ame_hf, "evaluate", stop("evaluate"))
    monkeypatch.setattr(ame_hf, "tune", stop("tune"))
    return seen


def test_the_advanced_options_reach_evaluate_and_tune(monkeypatch, tmp_path):
    """Evaluate's and Tune's Advanced options reach the library under their keywords (the evaluation's
    `batch_size`; tune's output options as its `config=`); blanks and 0 are the defaults, a bad value is the
    library's own message on one Gradio error line, and on a public Space a local tokenizer source is refused."""
    from ame_hf.space import build_app, one_line

    seen = _stop_evaluate_and_tune(monkeypatch, tmp_path)
    data = tmp_path / "val.jsonl"
    data.write_text('{"text": "red", "label": 0}\n')
    evaluate, tune = handler(build_app(), "evaluate"), handler(build_app(), "tune")
    first = ("org/a\norg/b", str(data), None, "auto", "", 0, 0, "", None, "")  # through the Base box

    assert _one_line_error(evaluate, "org/a", str(data), "auto", "", 0, "", "", 4) == "stop here"
    assert seen["evaluate"]["batch_size"] == 4
    _one_line_error(evaluate, "org/a", str(data), "auto", "", 0, "", "", 0)
    assert seen["evaluate"]["batch_size"] is None
    assert "batch_size must be a whole number >= 0" in _one_line_error(evaluate, "org/a", str(data), "auto", "", 0,
                                                                       "", "", 2.5)

    assert _one_line_error(tune, *first, 3, "bfloat16", "1", "float64", " 20KB ", True, "fp16") == "stop here"
    config = seen["tune"]["config"]
    assert seen["tune"]["batch_size"] == 3
    assert (config.dtype, config.tokenizer_source, config.compute_dtype, config.max_shard_size,
            config.allow_nonfinite, config.variant) == ("bfloat16", 1, "float64", "20KB", True, "fp16")
    _one_line_error(tune, *first)  # the boxes as they start: the library's defaults
    assert seen["tune"]["config"] == ame_hf.AmeConfig() and seen["tune"]["batch_size"] is None

    seen.clear()
    with pytest.raises(ame_hf.InvalidConfigError) as direct:
        ame_hf.AmeConfig(max_shard_size="20")
    assert _one_line_error(tune, *first, 0, "auto", "auto", "float32", "20") == one_line(direct.value)
    public = handler(build_app(allow_local_paths=False), "tune")
    assert "local paths are disabled" in _one_line_error(public, *first, 0, "auto", str(tmp_path))
    assert not seen and not list((tmp_path / "tmp").glob("ame-hf-space-*")), "a refused option reached tune"


def test_lm_eval_tasks_are_a_score_in_evaluate_and_tune(tmp_path, monkeypatch):
    """The lm-eval boxes reach `ame_hf.evaluate` and `ame_hf.tune` as their `lm_eval_*` keywords, instead of the
    data (blank boxes left out; the limit's 0 is no limit, a blank few-shot each task's own); on a public Space a
    task folder is refused, since its YAMLs can run code and read the server's disk."""
    from ame_hf.space import build_app

    seen = _stop_evaluate_and_tune(monkeypatch, tmp_path)
    app = build_app()
    evaluate, tune = handler(app, "evaluate"), handler(app, "tune")
    lm = (" count_mc=2 ", str(tmp_path), "acc_norm", 6.0, "1")
    assert _one_line_error(evaluate, "org/a", None, "auto", "", 0, "", "", 0, *lm) == "stop here"
    want = {"lm_eval_tasks": "count_mc=2", "lm_eval_include": str(tmp_path), "lm_eval_metric": "acc_norm",
            "lm_eval_limit": 6, "lm_eval_num_fewshot": 1}
    assert {k: v for k, v in seen["evaluate"].items() if k.startswith("lm_eval")} == want
    assert seen["evaluate"]["data"] is None
    _one_line_error(tune, "org/a\norg/b", None, None, "auto", "", 0, None, "", None, "", 0, "auto", "auto",
                    "float32", "", False, "", "model", 0, "", "count_mc", "", "", 0, "")
    assert {k: v for k, v in seen["tune"].items() if k.startswith("lm_eval")} == {"lm_eval_tasks": "count_mc"}
    assert "upload the data to score on" in _one_line_error(evaluate, "org/a", None, "auto", "", 0, "", "", 0,
                                                            "", "", "", 0, "")
    assert "lm_eval_limit must be a whole number >= 0" in _one_line_error(
        evaluate, "org/a", None, "auto", "", 0, "", "", 0, "count_mc", "", "", 2.5, "")
    public = build_app(allow_local_paths=False)
    seen.clear()
    assert "task folders are disabled in this app" in _one_line_error(handler(public, "evaluate"), "org/a", None,
                                                                      "auto", "", 0, "", "", 0, *lm)
    assert _one_line_error(handler(public, "evaluate"), "org/a", None, "auto", "", 0, "", "", 0, "arc_easy", "",
                           "", 0, "") == "stop here"
    assert not list((tmp_path / "tmp").glob("ame-hf-space-*")), "a refused option left a work folder"


def test_the_space_scores_lm_eval_tasks_as_the_library_does(lm_experts, tmp_path):
    pytest.importorskip("lm_eval", reason="the lm-eval extra is in `dev`")
    from test_lm_harness import write_task

    from ame_hf.space_select import evaluation_markdown, run_evaluate

    experts, _, _ = lm_experts
    tasks = write_task(tmp_path / "tasks")
    form = {"lm_eval_tasks": "count_mc", "lm_eval_include": str(tasks), "lm_eval_limit": 5.0}
    result = run_evaluate("\n".join(map(str, experts[:2])), None, "auto", "", 0, lm_eval=form)
    direct = ame_hf.evaluate(experts[:2], lm_eval_tasks="count_mc", lm_eval_include=tasks, lm_eval_limit=5)
    assert result.scores == direct.scores and result.metric == "acc,none"
    assert "| model | acc,none (higher is better) |" in evaluation_markdown(result)
