"""Evaluation (ame_hf/evaluation.py) offline on tiny text classifiers: bundled metrics, `ame-hf evaluate`
and `merge --eval-data` (scores in the card's model-index), bad data, `--task` inferred from the
model's architecture or refused with the reason, and PEFT adapters scored as their merge into their base
(checked against peft's `merge_and_unload()`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from ame_hf.cli import main
from ame_hf.errors import InvalidConfigError
from ame_hf.evaluation import check_task_fits, evaluate_model, infer_task, load_data, load_metric
from factories import (LM_LORAS, assert_one_error_line, cli_error_line, make_finetunes, make_lora_adapter,
                       make_text_classifiers, run_cli, score_table)


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
    scores = score_table(capsys.readouterr().out)
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
    rows = score_table(capsys.readouterr().out)
    assert list(rows)[0] == "m", rows  # the output as named by --out (it was "merged" whatever --out was)


def test_merge_eval_data_and_greedy_soup_take_adapters(lm_adapters, tmp_path, capsys):
    """`merge --eval-data` and `merge --greedy-soup` take PEFT adapters, as evaluate and tune do (they refused them:
    the pre-merge check read each ref's config.json, which an adapter has none of)."""
    refs = [*map(str, lm_adapters["adapters"]), str(lm_adapters["full"])]
    val = str(lm_adapters["val"])
    assert main(["merge", *refs, "--out", str(tmp_path / "ev"), "--optimizer", "sgd", "--pivot", "base",
                 "--eval-data", val, "--quiet"]) == 0
    rows = score_table(capsys.readouterr().out)
    assert list(rows)[0] == "ev" and len(rows) == 4, rows
    assert main(["merge", *refs, "--out", str(tmp_path / "greedy"), "--greedy-soup", "--eval-data", val,
                 "--quiet"]) == 0
    assert (tmp_path / "greedy" / "config.json").is_file() and not (tmp_path / "greedy" / "adapter_config.json").exists()


def test_bad_data_is_one_clear_line(classifiers, tmp_path, capsys):
    experts, _ = classifiers
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "x", "label": 0}\n')
    code = main(["evaluate", str(experts[0]), "--data", str(bad)])
    assert_one_error_line(code, capsys.readouterr().err, "`text` and `label`", exit_code=1)


def test_merge_eval_data_with_a_task_that_does_not_fit_fails_before_the_merge(tmp_path, capsys):
    llamas = make_finetunes(tmp_path / "llamas", n=2)  # causal LMs: no text-classification head
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "a", "label": 0}\n')
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["merge", *map(str, llamas), "--out", str(out), "--eval-data", str(val), "--task",
                 "text-classification", "--quiet"])
    assert_one_error_line(code, capsys.readouterr().err, "text-classification", exit_code=1)
    assert not out.exists() and not list(tmp_path.glob(".ame-tmp-*"))  # no merge was written
    capsys.readouterr()
    # Inferred: text-generation (a causal LM), which scores text with the tokenizer these folders lack.
    code = main(["merge", *map(str, llamas), "--out", str(out), "--eval-data", str(val), "--quiet"])
    assert_one_error_line(code, capsys.readouterr().err, "no tokenizer files", "text-generation", exit_code=1)
    assert not out.exists()


def test_infer_task_and_check_task_fits():
    assert infer_task({"architectures": ["BertForSequenceClassification"]}) == "text-classification"
    assert infer_task({"architectures": ["ViTForImageClassification"]}) == "image-classification"
    assert infer_task({"architectures": ["LlamaForCausalLM"]}) == "text-generation"
    assert infer_task({"architectures": ["GPT2LMHeadModel"]}) == "text-generation"
    assert infer_task({"architectures": ["BertModel"]}) is None and infer_task({}) is None
    check_task_fits({"architectures": ["GPT2LMHeadModel"]}, "text-generation", "m")
    check_task_fits({"architectures": ["BertForSequenceClassification"]}, "text-classification", "m")
    with pytest.raises(InvalidConfigError, match="org/m is a LlamaForCausalLM, which cannot do text-classification"):
        check_task_fits({"architectures": ["LlamaForCausalLM"]}, "text-classification", "org/m")
    with pytest.raises(InvalidConfigError, match="image-classification"):
        check_task_fits({"architectures": ["BertForSequenceClassification"]}, "image-classification", "m")
    with pytest.raises(InvalidConfigError, match="unknown task"):
        check_task_fits({}, "summarization", "m")


def test_evaluate_infers_the_task_or_says_why_not(llamas, tmp_path, capsys):
    experts, val = make_text_classifiers(tmp_path / "cls", n=1, steps=3)
    capsys.readouterr()
    assert main(["evaluate", str(experts[0]), "--data", str(val), "--quiet"]) == 0
    assert "accuracy" in capsys.readouterr().out
    code = main(["evaluate", str(llamas[0]), "--data", str(val)])  # text-generation, but no tokenizer to read text
    assert_one_error_line(code, capsys.readouterr().err, str(llamas[0]), "no tokenizer files", exit_code=1)
    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
    code = main(["evaluate", str(headless), "--data", str(val)])
    assert_one_error_line(code, capsys.readouterr().err, "cannot infer the task", "pass --task NAME", "BertModel",
                          "text-classification", "image-classification", "text-generation", exit_code=1)
    code = main(["evaluate", str(experts[0]), "--data", str(val), "--task", "image-classification"])
    assert_one_error_line(code, capsys.readouterr().err, "cannot do image-classification", exit_code=1)


# -- text-generation: causal LMs scored by their mean per-token loss ----------------------------

def test_lm_loss_is_the_token_weighted_mean_whatever_the_batching(lm_experts):
    """Padding never counts: the loss of batches of 1 and of 7 (padded) documents is the same, and equals a
    direct per-token cross-entropy over every document; perplexity is its exp; --max-length truncates."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ame_hf.lm_evaluation import mean_token_nll

    experts, val, _ = lm_experts
    data = load_data(val, "text-generation")
    one, n1 = mean_token_nll(str(experts[0]), data, batch_size=1, device="cpu")
    seven, n7 = mean_token_nll(str(experts[0]), data, batch_size=7, device="cpu")
    model, tok = AutoModelForCausalLM.from_pretrained(experts[0]), AutoTokenizer.from_pretrained(experts[0])
    total = count = 0
    with torch.no_grad():
        for text in data.texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert n1 == n7 == count and one == pytest.approx(total / count, rel=1e-5) and seven == pytest.approx(one, rel=1e-5)
    assert evaluate_model(str(experts[0]), data, "text-generation", "perplexity") == pytest.approx(math.exp(one), rel=1e-5)
    _, short = mean_token_nll(str(experts[0]), data, max_length=5, device="cpu")
    assert short == 4 * len(data)


def test_text_data_from_txt_and_jsonl_and_bad_files(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc\n\nsecond doc\n")
    assert load_data(txt, "text-generation").texts == ["first doc", "second doc"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a b"}\n{"text": "c"}\n')
    assert load_data(jsonl, "text-generation").texts == ["a b", "c"]
    jsonl.write_text('{"sentence": "a b"}\n')
    with pytest.raises(InvalidConfigError, match="`text` field"):
        load_data(jsonl, "text-generation")
    with pytest.raises(InvalidConfigError, match="does not exist"):
        load_data(tmp_path / "nope.txt", "text-generation")


def test_lm_eval_metrics_rank_the_way_lm_eval_registers_them():
    """lm-eval's own registry of which way each of its metrics is better (brier_score, bits_per_byte,
    word_perplexity: lower), read under the `metric,filter` keys tune ranks by."""
    from ame_hf.evaluation import higher_is_better

    registry = pytest.importorskip("lm_eval.api.registry", reason="the lm-eval extra is in `dev`")
    pytest.importorskip("lm_eval.api.metrics")  # registers the metrics

    higher = registry.HIGHER_IS_BETTER_REGISTRY
    assert len(higher) > 10 and not higher["brier_score"]
    assert {m: higher_is_better(f"{m},none") for m in higher} == dict(higher)


def test_metric_direction_and_defaults():
    from ame_hf.evaluation import default_metric, higher_is_better, is_better

    assert higher_is_better("accuracy") and higher_is_better("macro_f1")
    assert not higher_is_better("loss") and not higher_is_better("perplexity") and not higher_is_better("eval_loss")
    assert is_better(1.0, 2.0, "loss") and is_better(0.9, 0.8, "accuracy") and not is_better(1.0, 1.0, "loss")
    assert default_metric("text-generation") == "loss" and default_metric("image-classification") == "accuracy"
    with pytest.raises(InvalidConfigError, match="does not apply to text-generation"):
        default_metric("text-generation", "accuracy")


def test_evaluate_and_merge_eval_data_on_causal_lms(lm_experts, tmp_path, capsys):
    """`ame-hf evaluate` infers text-generation from GPT2LMHeadModel and prints loss with perplexity (lower is
    better); `merge --eval-data` records the loss and its perplexity in the model-index."""
    experts, val, _ = lm_experts
    capsys.readouterr()
    assert main(["evaluate", *map(str, experts), "--data", str(val), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "loss (lower is better)" in out and "perplexity" in out
    scores = score_table(out)
    data = load_data(val, "text-generation")
    assert scores[str(experts[1])] == pytest.approx(evaluate_model(str(experts[1]), data, "text-generation"), abs=1e-4)
    merged = tmp_path / "m"
    assert main(["merge", *map(str, experts), "--out", str(merged), "--eval-data", str(val), "--quiet"]) == 0
    card = ModelCard.load(merged / "README.md")
    assert [r.metric_type for r in card.data.eval_results] == ["loss", "perplexity"]
    assert card.data.eval_results[0].task_type == "text-generation" and "lower is better" in card.text


# -- PEFT LoRA adapters: scored as the full model they make of their base -----------------------

def test_an_adapter_scores_what_peft_merge_and_unload_scores(lm_adapters, tmp_path, monkeypatch, capsys):
    """`evaluate` of an adapter equals `evaluate` of peft's merge_and_unload() model saved to a folder; the full
    model ame-hf wrote to score it is gone afterwards, and `ame-hf evaluate --base` does the same."""
    import tempfile

    from ame_hf import evaluate

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    adapters, references, val = lm_adapters["adapters"], lm_adapters["references"], lm_adapters["val"]
    result = evaluate([*adapters, *references, lm_adapters["base"]], data=val)
    assert result.task == "text-generation" and result.metric == "loss"
    scores = [s for _, s in result.scores]
    for i in range(len(adapters)):
        assert scores[i] == pytest.approx(scores[len(adapters) + i], abs=1e-6)
        assert abs(scores[i] - scores[-1]) > 1e-2  # not the base's score: the adapter counts
    assert not list(scratch.iterdir())  # the adapters' full models were removed
    code, out, err = run_cli(capsys, "evaluate", adapters[0], "--base", lm_adapters["base"], "--data", val, "--quiet")
    assert code == 0, err
    assert score_table(out)[str(adapters[0])] == pytest.approx(scores[0], abs=1e-4)
    assert not list(scratch.iterdir())


def test_evaluate_removes_an_adapters_full_model_also_on_error(lm_adapters, tmp_path, monkeypatch):
    import tempfile

    import ame_hf.api as api

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seen = []

    def fail(model, *args, **kwargs):
        seen.append(Path(model))
        assert (Path(model) / "model.safetensors").is_file()  # a full model was written to be scored
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(api, "evaluate_model", fail)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        api.evaluate([lm_adapters["adapters"][0]], data=lm_adapters["val"])
    assert seen and not seen[0].exists() and not list(scratch.iterdir())


def test_an_adapter_without_a_base_is_one_line_before_any_evaluation(lm_adapters, tmp_path, monkeypatch, capsys):
    import ame_hf.api as api

    orphan = make_lora_adapter(lm_adapters["base"], tmp_path / "orphan", LM_LORAS[0], seed=3, base_name=None)
    monkeypatch.setattr(api, "evaluate_model", lambda *a, **k: pytest.fail("evaluated before the base was known"))
    cli_error_line(capsys, "evaluate", lm_adapters["full"], orphan, "--data", lm_adapters["val"],
                   needles=[str(orphan), "names no base model", "--base"], exit_code=1)


def test_a_hub_adapter_is_evaluated_by_repo_id(lm_adapters, hub, hub_token, tmp_path):
    """A Hub adapter brings its own files, not weights (`resolve_refs`), and its base is fetched as a merge
    fetches it: the score is that of peft's merge of the local copy."""
    import json

    from huggingface_hub import HfApi

    from ame_hf import evaluate

    api = HfApi(token=hub_token)
    api.create_repo("org/eval-lora-base", exist_ok=True)
    api.upload_folder(repo_id="org/eval-lora-base", folder_path=lm_adapters["base"])
    folder = tmp_path / "up"
    folder.mkdir()
    config = json.loads((lm_adapters["adapters"][1] / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/eval-lora-base"}))
    (folder / "adapter_model.safetensors").write_bytes((lm_adapters["adapters"][1] / "adapter_model.safetensors").read_bytes())
    api.create_repo("org/eval-lora", exist_ok=True)
    api.upload_folder(repo_id="org/eval-lora", folder_path=folder)
    result = evaluate(["org/eval-lora", lm_adapters["references"][1]], data=lm_adapters["val"], token=hub_token)
    assert result.scores[0][0] == "org/eval-lora"
    assert result.scores[0][1] == pytest.approx(result.scores[1][1], abs=1e-6)


def test_data_errors_name_the_keyword_in_python_and_the_flag_in_the_cli(classifiers, tmp_path, capsys):
    """Issue 20 item 4: a missing data file is `data='...'` from Python and `--data ...` (merge: `--eval-data`)
    from the command line; neither names the other's form."""
    import ame_hf
    from ame_hf.errors import InvalidConfigError

    experts, _ = classifiers
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InvalidConfigError) as raised:
        ame_hf.evaluate([experts[0]], data=missing)
    assert f"data={str(missing)!r} does not exist" in str(raised.value) and "--data" not in str(raised.value)
    assert main(["evaluate", str(experts[0]), "--data", str(missing)]) in (1, 2)
    assert f"--data {missing} does not exist" in capsys.readouterr().err
    assert main(["merge", *map(str, experts), "--out", str(tmp_path / "m"), "--eval-data", str(missing)]) in (1, 2)
    err = capsys.readouterr().err
    assert f"--eval-data {missing} does not exist" in err and "data=" not in err, err
