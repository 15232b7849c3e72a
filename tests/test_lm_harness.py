"""lm-evaluation-harness tasks as the score of `evaluate`, `tune` and the greedy soup (issue 24): a tiny local
multiple-choice task (YAML + JSONL written here, nothing downloaded), tiny GPT-2 experts built so that one answers
it right and the others wrong, and lm-eval's own entry point on the same written model as the reference."""

from __future__ import annotations

import json
import shutil
import subprocess
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
    # A task whose YAML says its metric is better lower, where ame-hf ranks it higher: the selection would pick
    # the worse model, so it is refused before any merge, naming the task.
    other = tmp_path / "other"
    write_task(other, "count_low")
    yaml = other / "count_low.yaml"
    yaml.write_text(yaml.read_text().replace("higher_is_better: true", "higher_is_better: false"))
    code, _, err = run_cli(capsys, "tune", *experts[:2], "-o", tmp_path / "out", "--lm-eval-tasks", "count_low",
                           "--lm-eval-include", other, "--quiet")
    assert_one_error_line(code, err, "lm-eval task count_low declares acc better lower")
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


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ame_hf", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_quiet_means_quiet_and_progress_stays_without_it(mc, tmp_path):
    """`--quiet`: lm-eval's bars (its documents, tokenizing, requests), datasets' and git's `fatal: not a git
    repository` (lm-eval asks git for a commit hash; tmp_path is no repository) are not printed, only the result.
    Without it, lm-eval's progress bars stay."""
    experts, tasks = mc
    args = ("evaluate", experts[0], experts[1], "--lm-eval-tasks", "count_mc", "--lm-eval-include", tasks,
            "--device", "cpu")
    quiet = _cli(*args, "--quiet", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr
    lines = quiet.stdout.splitlines()
    assert lines[0].split() == ["model", "acc,none", "(higher", "is", "better)"] and set(lines[1]) == {"-"}
    assert [line.split()[0] for line in lines[2:]] == [str(experts[0]), str(experts[1])], quiet.stdout
    loud = _cli(*args, cwd=tmp_path)
    assert loud.returncode == 0 and loud.stdout == quiet.stdout, loud.stderr
    assert "Running loglikelihood requests" in loud.stderr and "100%|" in loud.stderr


def test_tune_quiet_prints_only_its_lines(mc, tmp_path):
    experts, tasks = mc
    run = _cli("tune", *experts[:2], "-o", tmp_path / "best", "--lm-eval-tasks", "count_mc", "--lm-eval-include",
               tasks, "--budget", "0", "--device", "cpu", "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", run.stderr
    assert "%|" not in run.stdout and "fatal" not in run.stdout and (tmp_path / "best" / RESULTS_FILE).is_file()


@pytest.fixture(scope="module")
def grouped(mc, tmp_path_factory) -> Path:
    """Local task YAMLs beside count_mc: a task that `include`s it and adds acc_norm, a group of both that
    aggregates acc, a group that aggregates nothing, and a tag."""
    _, tasks = mc
    folder = write_task(tmp_path_factory.mktemp("grouped"))
    (folder / "count_inc.yaml").write_text("include: count_mc.yaml\ntask: count_inc\ntag: count_tag\n"
                                           "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "count_grp.yaml").write_text("group: count_grp\ntask:\n  - count_mc\n  - count_inc\n"
                                           "aggregate_metric_list:\n  - metric: acc\n")
    (folder / "count_bare.yaml").write_text("group: count_bare\ntask:\n  - count_mc\n")
    return folder


@pytest.mark.parametrize("name, metric, reports", [
    ("count_grp", "acc_norm", "acc,none"),  # the group aggregates acc only, though count_inc has acc_norm
    ("count_inc", "f1", "acc,none, acc_norm,none"),  # its metric_list, its data from the included YAML
    ("count_bare", "acc", "nothing (a group without aggregate_metric_list"),
    ("count_tag", "acc", "nothing (a tag: name its tasks, count_inc)"),
])
def test_groups_includes_and_tags_are_checked_before_any_merge(mc, grouped, tmp_path, capsys, name, metric, reports):
    """The metric a group, an including task or a tag reports is read from lm-eval's task index, so a metric it
    does not have is refused before anything is scored or merged (before, a group's was found only after the
    first model was scored). The tasks' data file is gone: any run would fail on it instead."""
    experts, _ = mc
    source, grouped = grouped, Path(shutil.copytree(grouped, tmp_path / "nodata"))
    (grouped / "count_mc.jsonl").unlink()
    yaml = grouped / "count_mc.yaml"
    yaml.write_text(yaml.read_text().replace(str(source), str(grouped)))
    assert str(grouped / "count_mc.jsonl") in yaml.read_text()
    lines: list[str] = []
    with pytest.raises(InvalidConfigError) as caught:
        tune(experts[:2], tmp_path / "out", lm_eval_tasks=name, lm_eval_include=grouped, lm_eval_metric=metric,
             device="cpu", progress=False, log=lines.append)
    assert f"lm-eval task {name} has no metric '{metric},none'; it reports: {reports}" in str(caught.value)
    assert lines == [] and not (tmp_path / "out").exists(), "something was scored or merged before the refusal"
    code, _, err = run_cli(capsys, "evaluate", *experts[:2], "--lm-eval-tasks", name, "--lm-eval-include", grouped,
                           "--lm-eval-metric", metric, "--quiet")
    assert_one_error_line(code, err, f"lm-eval task {name} has no metric '{metric},none'")


def test_a_group_and_an_including_task_score_as_lm_eval_scores_them(mc, grouped):
    experts, _ = mc
    got = evaluate([experts[0]], lm_eval_tasks="count_grp", lm_eval_include=grouped, device="cpu")
    from lm_eval.tasks import TaskManager

    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={experts[0]}", tasks=["count_grp"],
                                  device="cpu", task_manager=TaskManager(include_path=str(grouped)))["results"]
    assert got.scores[0][1] == ref["count_grp"]["acc,none"] == 1.0  # expert 0 answers both right
    with pytest.raises(InvalidConfigError, match="unknown lm-eval task"):
        evaluate([experts[0]], lm_eval_tasks="count_grp,nope", lm_eval_include=grouped, device="cpu")
    # lm-eval runs a task once: a group and one of its tasks together are refused before any model is scored.
    with pytest.raises(InvalidConfigError, match="lm-eval tasks count_grp and count_mc both run count_mc"):
        tune(experts[:2], grouped / "out", lm_eval_tasks="count_grp,count_mc", lm_eval_include=grouped,
             progress=False, log=lambda line: pytest.fail(f"scored before the refusal: {line}"))


# Every label of the task is 0, so sklearn finds f1 of the positive class ill-defined in each of the 1000 draws.
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_a_bootstrapped_metric_takes_1000_draws_in_this_process_and_prints_nothing_when_quiet(mc, tmp_path, capfd,
                                                                                               monkeypatch):
    """f1 is no mean: lm-eval bootstraps its standard error. ame-hf asks for 1000 draws without lm-eval's process
    pool (its default, 100000 in a pool forked from a process with threads, took 82 s per metric on 2 cores,
    `benchmarks/lm_eval_bootstrap.py --pool`, and can hang): a number for `f1_stderr`, the same every run (lm-eval seeds its draws); its line on stdout and
    its bar are not shown when quiet; the environment is left as it was."""
    import os

    from ame_hf.lm_harness import BOOTSTRAP_ITERS, LmEvalTasks, run_tasks

    experts, _ = mc
    tasks = write_task(tmp_path / "tasks", "count_f1")
    yaml = tasks / "count_f1.yaml"
    yaml.write_text(yaml.read_text().replace("metric: acc\n    aggregation: mean", "metric: f1\n    aggregation: f1"))
    spec = LmEvalTasks((("count_f1", 1.0),), metric="f1,none", include=str(tasks))
    assert "DISABLE_MULTIPROC" not in os.environ
    import multiprocessing  # lm-eval's pool: both ways print the same line, which the quiet run drops

    monkeypatch.setattr(multiprocessing, "Pool", lambda *a, **k: pytest.fail("lm-eval's process pool was used"))
    capfd.readouterr()
    runs = [run_tasks(experts[0], spec, device="cpu") for _ in range(2)]
    out, err = capfd.readouterr()
    assert "bootstrapping" not in out  # lm-eval's line; transformers' own bar loading the model is not ours
    assert not [line for line in err.replace("\r", "\n").splitlines()
                if line.strip() and not line.startswith("Loading weights")]
    assert BOOTSTRAP_ITERS == 1000 and runs[0]["config"]["bootstrap_iters"] == 1000
    row = runs[0]["results"]["count_f1"]
    assert isinstance(row["f1_stderr,none"], float)  # "N/A" without draws
    assert row == runs[1]["results"]["count_f1"]
    assert "DISABLE_MULTIPROC" not in os.environ
