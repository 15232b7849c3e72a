"""lm-evaluation-harness tasks as the score of `evaluate`, `tune` and the greedy soup (issue 24): a tiny local
multiple-choice task (YAML + JSONL written here, nothing downloaded), tiny GPT-2 experts built so that one answers
it right and the others wrong, and lm-eval's own entry point on the same written model as the reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ame_hf import InvalidConfigError, evaluate, tune
from ame_hf.lm_harness import RESULTS_FILE, lm_eval_tasks
from factories import assert_one_error_line, run_cli, score_table

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra (pip install 'ame-hf[lm-eval]') is in `dev`")

STEPS = {0: 1, 1: 3, 2: 5}  # expert i continues "<count> x" with x + STEPS[i]: only expert 0 is right


def _train(model, step: int, seed: int) -> None:
    from ame_hf.demo import TASK_TOKEN, VOCAB

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        x = torch.randint(0, VOCAB, (32, 1), generator=gen)
        batch = torch.cat([torch.full((32, 1), TASK_TOKEN["count"]), x, (x + step) % VOCAB], dim=1)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def write_task(folder: Path, name: str = "count_mc") -> Path:
    """A local multiple-choice task: after `<count> x`, which of x+1, x+3, x+5 comes next (the answer is x+1).
    `dataset_path: json` with `data_files` (a `dataset_path` naming the .jsonl itself fails in lm-eval)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"context": f"<count> {x}", "choices": [str((x + s) % 20) for s in (1, 3, 5)], "label": 0}
            for x in range(20)]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / (name + '.jsonl')}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\ntarget_delimiter: \" \"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


@pytest.fixture(scope="module")
def mc(tmp_path_factory) -> tuple[list[Path], Path]:
    """Three tiny GPT-2 experts of one base (0 answers the task right, 1 and 2 wrong) and the task folder."""
    from transformers import GPT2LMHeadModel

    from ame_hf.demo import _save, tiny_config, tiny_tokenizer

    root = tmp_path_factory.mktemp("mc")
    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_config())
    experts = []
    for i, step in STEPS.items():
        model = GPT2LMHeadModel(tiny_config())
        model.load_state_dict(base.state_dict())
        _train(model, step, seed=i)
        _save(model, tiny_tokenizer(), root / f"expert{i}")
        experts.append(root / f"expert{i}")
    return experts, write_task(root / "tasks")


def reference(model: Path, tasks: Path, **kwargs) -> dict:
    """lm-eval's own entry point on a written model folder (`--model hf --model_args pretrained=DIR`)."""
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model}", tasks=["count_mc"], device="cpu",
                                   task_manager=TaskManager(include_path=str(tasks)), **kwargs)["results"]


def test_evaluate_gives_lm_evals_own_numbers_and_models_never_share_scores(mc, capsys):
    experts, tasks = mc
    code, out, err = run_cli(capsys, "evaluate", *experts, experts[0], "--lm-eval-tasks", "count_mc",
                             "--lm-eval-include", tasks, "--device", "cpu", "--quiet")
    assert code == 0, err
    scores = list(score_table(out).values())
    assert "acc,none (higher is better)" in out
    # By construction: only expert 0 answers right. A request cache shared between models (lm-eval keys it by
    # request) would give every model after the first the first one's score; the repeat of expert 0 comes last.
    assert scores[0] == 1.0 and scores[1] == 0.0 and scores[2] == 0.0
    assert len(score_table(out)) == 3  # expert 0 twice: one row (same label), scored twice
    for expert in experts:
        ours = evaluate([expert], lm_eval_tasks="count_mc", lm_eval_include=tasks, device="cpu").scores[0][1]
        assert ours == reference(expert, tasks)["count_mc"]["acc,none"]


def test_tune_selects_the_expert_that_answers_and_keeps_its_lm_eval_results(mc, tmp_path):
    experts, tasks = mc
    out = tmp_path / "best"
    result = tune(experts, out, lm_eval_tasks=["count_mc"], lm_eval_include=tasks, budget=2, device="cpu",
                  progress=False)
    ingredients = {c.ingredient: c.score for c in result.candidates if c.ingredient is not None and c.kept is None}
    assert [ingredients[i] for i in range(3)] == [1.0, 0.0, 0.0]
    assert result.metric == "acc,none" and result.best.score == 1.0 == max(c.score for c in result.candidates)
    # What is written is what was selected: lm-eval's own run on the output gives the selected score.
    assert reference(out, tasks)["count_mc"]["acc,none"] == result.best.score
    kept = json.loads((out / RESULTS_FILE).read_text())
    assert kept["results"]["count_mc"]["acc,none"] == 1.0 and kept["ame_hf"]["score"] == 1.0
    assert (out / "ame_config.yaml").is_file()
    from huggingface_hub import ModelCard

    results = ModelCard.load(out / "README.md").data.eval_results
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in results] == [("count_mc", "acc", 1.0)]


def test_greedy_soup_takes_lm_eval_tasks_with_limit_and_fewshot(mc, tmp_path, capsys):
    experts, tasks = mc
    out = tmp_path / "greedy"
    code, stdout, err = run_cli(capsys, "merge", *experts[:2], "-o", out, "--greedy-soup", "--lm-eval-tasks",
                                "count_mc=2", "--lm-eval-include", tasks, "--lm-eval-limit", "6",
                                "--lm-eval-num-fewshot", "1", "--quiet")
    assert code == 0, err
    kept = json.loads((out / RESULTS_FILE).read_text())
    assert kept["n-shot"] == {"count_mc": 1} and kept["n-samples"]["count_mc"]["effective"] == 6
    assert kept["ame_hf"]["weights"] == {"count_mc": 2.0}
    ref = reference(out, tasks, limit=6, num_fewshot=1)["count_mc"]["acc,none"]
    assert kept["results"]["count_mc"]["acc,none"] == ref


def test_lm_eval_options_are_checked_before_any_merge(mc, tmp_path, capsys):
    experts, tasks = mc
    cases = [
        (("--lm-eval-tasks", "nope", "--lm-eval-include", tasks), ("unknown lm-eval task(s) nope",)),
        (("--lm-eval-limit", "3", "--data", tasks / "count_mc.jsonl"), ("--lm-eval-limit needs --lm-eval-tasks",)),
        (("--lm-eval-tasks", "count_mc", "--lm-eval-include", tmp_path / "missing"), ("is not a folder",)),
        (("--lm-eval-tasks", "count_mc=-1", "--lm-eval-include", tasks), ("NAME=WEIGHT",)),
    ]
    for flags, needles in cases:
        code, _, err = run_cli(capsys, "tune", *experts[:2], "-o", tmp_path / "out", *map(str, flags), "--quiet")
        assert_one_error_line(code, err, *needles)
        assert not (tmp_path / "out").exists()
    # A metric the task's own YAML does not declare: refused before any merge too.
    code, _, err = run_cli(capsys, "tune", *experts[:2], "-o", tmp_path / "out", "--lm-eval-tasks", "count_mc",
                           "--lm-eval-include", tasks, "--lm-eval-metric", "f1,none", "--quiet")
    assert_one_error_line(code, err, "has no metric 'f1,none'; it reports: acc,none")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidConfigError, match="not both"):
        evaluate(experts[:1], data=tasks / "count_mc.jsonl", lm_eval_tasks="count_mc")


def test_a_missing_extra_is_one_line_saying_how_to_install(mc, monkeypatch, capsys):
    experts, tasks = mc
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    code, _, err = run_cli(capsys, "evaluate", experts[0], "--lm-eval-tasks", "count_mc", "--quiet")
    assert_one_error_line(code, err, "pip install 'ame-hf[lm-eval]'")


def test_parsing_the_options():
    spec = lm_eval_tasks("a=2, b", metric="acc_norm", limit=5, num_fewshot=0)
    assert spec.tasks == (("a", 2.0), ("b", 1.0)) and spec.metric == "acc_norm,none" and spec.name == "lm-eval a+b"
    assert lm_eval_tasks(None) is None


def test_merge_scores_its_output_and_ingredients_on_lm_eval_tasks(mc, tmp_path, capsys):
    experts, tasks = mc
    out = tmp_path / "merged"
    code, stdout, err = run_cli(capsys, "merge", *experts[:2], "-o", out, "--lm-eval-tasks", "count_mc",
                                "--lm-eval-include", tasks, "--quiet")
    assert code == 0, err
    scores = score_table(stdout)
    assert list(scores.values())[1:] == [1.0, 0.0]  # the ingredients, after the merge
    kept = json.loads((out / RESULTS_FILE).read_text())
    assert kept["ame_hf"]["score"] == list(scores.values())[0] == reference(out, tasks)["count_mc"]["acc,none"]
