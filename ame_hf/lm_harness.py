"""Score causal language models on lm-evaluation-harness tasks (lm-eval's own or local task YAMLs), in this
process: lm-eval's `HFLM` wrapped around an already-built model, with no request cache shared between models."""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ._lm_eval_tasks import leaf_tasks, reported_metrics
from .errors import InvalidConfigError

logger = logging.getLogger(__name__)

INSTALL = "pip install 'ame-hf[lm-eval]'"
DEFAULT_METRIC = "acc,none"
RESULTS_FILE = "lm_eval_results.json"
# lm-eval's entries kept in RESULTS_FILE (its environment dump and the model object's repr are left out).
_KEPT = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
         "lm_eval_version", "transformers_version", "date")
_MANAGERS: dict[str | None, Any] = {}
# Draws of lm-eval's bootstrap for the standard error of metrics it does not average (f1, mcc, bleu, a median; a
# mean's is exact): its default, 100000 in a process pool forked from ours, took 82 s per metric and run on 2 cores
# (185 s in-process), and a fork of a process with threads can hang; 1000 draws in-process: 2.8 s
# (`benchmarks/lm_eval_bootstrap.py --pool`, f1 over 20 documents). The scores do not depend on it, only the
# `_stderr` entries (lm-eval's `bootstrap_iters`).
BOOTSTRAP_ITERS = 1000
# The latest lm-eval results of the model folders scored in this process (by resolved path), so that the output's
# results file reuses its selection run; bounded, and read only by `record` for a folder the caller names.
_RESULTS: OrderedDict[str, dict[str, Any]] = OrderedDict()


@dataclass(frozen=True)
class LmEvalTasks:
    """lm-eval tasks as the score of a model: their `metric` (lm-eval's name, e.g. `acc,none`), averaged over
    the tasks with their weights.

    Attributes:
        tasks: `(task name, weight)` pairs.
        metric: the metric as lm-eval names it in its results (`acc,none`, `acc_norm,none`, ...).
        include: a folder of local task YAMLs (lm-eval's `--include_path`).
        limit: score only the first N documents of each task.
        num_fewshot: few-shot examples per prompt (default: each task's own setting).
    """

    tasks: tuple[tuple[str, float], ...]
    metric: str = DEFAULT_METRIC
    include: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None

    @property
    def name(self) -> str:
        """How tables and cards name this score's data: `lm-eval count_mc` (tasks joined by `+`)."""
        return "lm-eval " + "+".join(t for t, _ in self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [t for t, _ in self.tasks]


def _parse_tasks(tasks: str | Sequence[str]) -> tuple[tuple[str, float], ...]:
    items = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    out = []
    for item in (i.strip() for i in items):
        name, _, weight = item.partition("=")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = -1.0
        if not name.strip() or value <= 0:
            raise InvalidConfigError(f"lm_eval_tasks: {item!r} is not NAME or NAME=WEIGHT (a positive number), e.g. "
                                     "arc_easy,hellaswag=2", field="lm_eval_tasks")
        out.append((name.strip(), value))
    if not out:
        raise InvalidConfigError("lm_eval_tasks is empty: name one task or more, e.g. arc_easy", field="lm_eval_tasks")
    return tuple(out)


def lm_eval_tasks(tasks: str | Sequence[str] | None, *, include: str | os.PathLike | None = None,
                  metric: str | None = None, limit: int | None = None,
                  num_fewshot: int | None = None) -> LmEvalTasks | None:
    """The lm-eval score the options describe (None without `tasks`); checked without importing lm-eval.

    Args:
        tasks: `NAME[=WEIGHT],...` or a list of them (lm-eval's task names, or those of `include`'s YAMLs).
        include: a folder of task YAMLs.
        metric: lm-eval's metric name (default `acc,none`; a name without `,FILTER` gets `,none`).
        limit: documents scored per task.
        num_fewshot: few-shot examples per prompt.

    Returns:
        An `LmEvalTasks`, or None.

    Raises:
        InvalidConfigError: an option without `tasks`, a missing folder, a weight or number that is not positive.

    >>> lm_eval_tasks("arc_easy,hellaswag=2", metric="acc_norm").tasks
    (('arc_easy', 1.0), ('hellaswag', 2.0))
    >>> lm_eval_tasks("arc_easy", metric="acc_norm").metric
    'acc_norm,none'
    """
    if tasks is None or (isinstance(tasks, (list, tuple)) and not tasks):
        given = [k for k, v in (("lm_eval_include", include), ("lm_eval_metric", metric), ("lm_eval_limit", limit),
                                ("lm_eval_num_fewshot", num_fewshot)) if v is not None]
        if given:
            raise InvalidConfigError(f"{', '.join(given)} needs lm_eval_tasks (the tasks to score)",
                                     fields=[*given, "lm_eval_tasks"])
        return None
    if include is not None and not Path(include).is_dir():
        raise InvalidConfigError(f"lm_eval_include={os.fspath(include)!r} is not a folder (of task YAML files)",
                                 field="lm_eval_include")
    for key, value, least in (("lm_eval_limit", limit, 1), ("lm_eval_num_fewshot", num_fewshot, 0)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise InvalidConfigError(f"{key}={value!r}: expected a whole number >= {least}", field=key)
    metric = (metric or DEFAULT_METRIC).strip()
    if not metric or metric.startswith(","):
        raise InvalidConfigError(f"lm_eval_metric={metric!r}: expected lm-eval's name, e.g. acc,none",
                                 field="lm_eval_metric")
    return LmEvalTasks(tasks=_parse_tasks(tasks), metric=metric if "," in metric else metric + ",none",
                       include=os.fspath(Path(include).absolute()) if include is not None else None, limit=limit,
                       num_fewshot=num_fewshot)


def data_or_tasks(data: Any, **options: Any) -> Any:
    """`data`, or the `LmEvalTasks` the `lm_eval_*` keywords describe: exactly one of them.

    Raises:
        InvalidConfigError: both, or neither.
    """
    spec = lm_eval_tasks(options.pop("lm_eval_tasks", None), **{k.removeprefix("lm_eval_"): v for k, v in options.items()})
    if spec is not None and data is not None:
        raise InvalidConfigError("give data or lm_eval_tasks, not both: each is the score", fields=("data", "lm_eval_tasks"))
    if spec is None and data is None:
        raise InvalidConfigError("no validation data: give data=FILE or lm_eval_tasks=NAME", field="data")
    return spec if spec is not None else data


def _import() -> tuple[Any, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise InvalidConfigError(f"lm-eval tasks need lm-evaluation-harness ({err}): {INSTALL}",
                                 field="lm_eval_tasks") from err
    return lm_eval, HFLM


def _manager(include: str | None) -> Any:
    """lm-eval's task index (slow to build: kept for the process)."""
    if include not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[include] = TaskManager(include_path=include, verbosity="ERROR")
    return _MANAGERS[include]


def check_tasks(spec: LmEvalTasks, task: str, higher_is_better: Callable[[str], bool]) -> LmEvalTasks:
    """Before any merge: lm-eval installed, the models causal LMs, every task known to lm-eval, its metric
    reported and ranked the way the task's YAML declares it better (`higher_is_better`: how ame-hf ranks it).

    Raises:
        InvalidConfigError: one line naming what is missing.
    """
    if task != "text-generation":
        raise InvalidConfigError(f"lm-eval tasks score causal language models (text-generation), not {task}",
                                 fields=("lm_eval_tasks", "task"))
    _import()
    known = set(_manager(spec.include).all_tasks)
    unknown = [t for t in spec.task_names if t not in known]
    if unknown:
        where = f" or in {spec.include}" if spec.include else "; pass lm_eval_include=DIR for local task YAMLs"
        raise InvalidConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}: not among lm-eval's tasks{where}",
                                 field="lm_eval_tasks")
    index = _manager(spec.include).task_index
    _refuse_overlaps(index, spec.task_names)
    for name in spec.task_names:
        reported = reported_metrics(index, name)
        if reported is not None and spec.metric not in reported:
            raise InvalidConfigError(f"lm-eval task {name} has no metric {spec.metric!r}; it reports: "
                                     f"{', '.join(sorted(reported)) or _why_nothing(index[name])}",
                                     field="lm_eval_metric")
        _refuse_other_direction(index, name, spec.metric, higher_is_better(spec.metric))
    return spec


def _refuse_other_direction(index: Any, name: str, metric: str, ours: bool) -> None:
    """A task YAML may say which way its metric is better (`metric_list: [{metric: x, higher_is_better: false}]`);
    where that is not the way ame-hf ranks `metric` (`ours`: higher is better), the selection would prefer the
    worse model: refused before any merge, naming the task."""
    base = metric.split(",")[0]
    for leaf in sorted(leaf_tasks(index, name) or ()):
        entry = index.get(leaf)
        listed = (getattr(entry, "cfg", None) or {}).get("metric_list")
        for item in listed if isinstance(listed, list) else ():
            declared = item.get("higher_is_better") if isinstance(item, dict) and item.get("metric") == base else None
            if isinstance(declared, bool) and declared != ours:
                way = "higher" if declared else "lower"
                raise InvalidConfigError(
                    f"lm-eval task {leaf} declares {base} better {way}, and ame-hf ranks {base} the other way; "
                    "choose another --lm-eval-metric", field="lm_eval_metric")


def _refuse_overlaps(index: Any, names: Sequence[str]) -> None:
    """lm-eval refuses to run a task twice (`count_grp,count_mc` where the group holds count_mc): before any merge."""
    runs: dict[str, str] = {}
    for name in names:
        for leaf in sorted(leaf_tasks(index, name) or ()):
            if runs.setdefault(leaf, name) != name:
                raise InvalidConfigError(f"lm-eval tasks {runs[leaf]} and {name} both run {leaf} (lm-eval runs a task "
                                         "once): name one of them", field="lm_eval_tasks")


def _why_nothing(entry: Any) -> str:
    if entry.kind.name == "TAG":
        return f"nothing (a tag: name its tasks, {', '.join(sorted(entry.tags))})"
    return "nothing (a group without aggregate_metric_list: name its tasks, or give it one)"


def run_tasks(model: Any, spec: LmEvalTasks, *, device: str | None = None, batch_size: int | None = None,
              max_length: int | None = None, progress: bool = False, samples: bool = False) -> dict[str, Any]:
    """lm-eval's results for one model (a folder, or a loaded causal LM whose `name_or_path` has its tokenizer).

    Each call builds its own `HFLM` and runs without lm-eval's request cache (`use_cache=None`, no cached
    requests): lm-eval keys that cache by request, not by model, so a shared one would give every model the
    first one's scores. Without `progress`, lm-eval's bars and its `git` line are not shown (`_lm_eval_quiet`).

    With `samples`, lm-eval logs each document (`log_samples`) and the output keeps them under `samples` (for
    `per_document`: the caller drops them; the results kept for `record` never hold them).

    Returns:
        lm-eval's output (`results`, `configs`, `n-shot`, ...).
    """
    from unittest.mock import patch  # the standard library's: sets a variable and restores it (not at start-up)

    import torch

    from ._lm_eval_quiet import quiet_lm_eval, quiet_requests
    from .lm_evaluation import _load

    lm_eval, HFLM = _import()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded, tokenizer = _load(model, device)
    quiet = logging.getLogger("lm_eval")  # its advice about a model object passed in is about launching it
    level, quiet.level = quiet.level, logging.ERROR
    try:
        lm = HFLM(pretrained=loaded, tokenizer=tokenizer, batch_size=batch_size or 8, device=device,
                  **({"max_length": max_length} if max_length else {}))
        # lm-eval's bootstrap without its process pool (its switch; the variable restored after).
        with quiet_lm_eval(not progress), patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"}):
            out = lm_eval.simple_evaluate(model=lm if progress else quiet_requests(lm), tasks=spec.task_names,
                                          task_manager=_manager(spec.include), num_fewshot=spec.num_fewshot,
                                          limit=spec.limit, use_cache=None, cache_requests=False, log_samples=samples,
                                          bootstrap_iters=BOOTSTRAP_ITERS, verbosity="ERROR")
    finally:
        quiet.setLevel(level)
    if out is None:
        raise InvalidConfigError("lm-eval returned no results (a non-main process of a distributed run?)")
    if isinstance(model, (str, os.PathLike)):
        _RESULTS[str(Path(model).resolve())] = {k: v for k, v in out.items() if k != "samples"}
        while len(_RESULTS) > 64:
            _RESULTS.popitem(last=False)
    return out


def task_scores(out: dict[str, Any], spec: LmEvalTasks) -> dict[str, float]:
    """`{task: value of the metric}` from lm-eval's output.

    Raises:
        InvalidConfigError: a task without that metric (naming the ones it has).
    """
    scores = {}
    for name in spec.task_names:
        row = out["results"].get(name, {})
        if spec.metric not in row:
            has = [k for k in row if "," in k and "_stderr" not in k]
            raise InvalidConfigError(f"lm-eval task {name} has no metric {spec.metric!r}; it reports: "
                                     f"{', '.join(has) or 'nothing'} (pass one with lm_eval_metric)",
                                     field="lm_eval_metric")
        scores[name] = float(row[spec.metric])
    return scores


def combined(scores: dict[str, float], spec: LmEvalTasks) -> float:
    """The weighted mean of the tasks' scores.

    >>> combined({"a": 0.5, "b": 1.0}, LmEvalTasks(tasks=(("a", 1.0), ("b", 3.0))))
    0.875
    """
    total = sum(w for _, w in spec.tasks)
    return sum(scores[t] * w for t, w in spec.tasks) / total


def score(model: Any, spec: LmEvalTasks, *, device: str | None = None, batch_size: int | None = None,
          max_length: int | None = None, progress: bool = False, per_example: list[Any] | None = None) -> float:
    """The score of one model: `spec.metric` averaged over the tasks with their weights (`evaluate_model`'s).

    With `per_example`, lm-eval logs every document and the list receives `_lm_eval_examples.per_document`'s
    floats (whose weighted mean is this score), or the line saying why there are none; the samples are dropped."""
    out = run_tasks(model, spec, device=device, batch_size=batch_size, max_length=max_length, progress=progress,
                    samples=per_example is not None)
    value = combined(task_scores(out, spec), spec)
    if per_example is not None:
        from ._lm_eval_examples import per_document

        per_example.append(per_document(out, spec.tasks, spec.metric, _manager(spec.include).task_index))
    return value


def record(folder: str | os.PathLike, spec: LmEvalTasks, *, scored_as: str | os.PathLike | None = None,
           device: str | None = None, batch_size: int | None = None, max_length: int | None = None,
           progress: bool = False) -> Path:
    """Write the output's lm-eval results beside its `ame_config.yaml` and its task scores into the card's
    `model-index`.

    Args:
        folder: the output folder.
        spec: the tasks.
        scored_as: the folder this same model was scored in during the run (its results are reused); otherwise,
            or when that run's results are gone, `folder` itself is scored.
        device, batch_size, max_length, progress: of that scoring.

    Returns:
        The results file.
    """
    from lm_eval.utils import handle_non_serializable

    key = str(Path(scored_as).resolve()) if scored_as is not None else None
    out = _RESULTS.get(key) if key else None
    if out is None:
        out = run_tasks(folder, spec, device=device, batch_size=batch_size, max_length=max_length, progress=progress)
    _RESULTS[str(Path(folder).resolve())] = out  # an output made from this one (an adapter) reuses them
    scores = task_scores(out, spec)
    kept = {k: out[k] for k in _KEPT if k in out}
    kept["ame_hf"] = {"metric": spec.metric, "weights": dict(spec.tasks), "score": combined(scores, spec),
                      "limit": spec.limit, "num_fewshot": spec.num_fewshot}
    path = Path(folder) / RESULTS_FILE
    path.write_text(json.dumps(kept, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
    _card_results(Path(folder), out, spec, scores)
    return path


def _card_results(folder: Path, out: dict[str, Any], spec: LmEvalTasks, scores: dict[str, float]) -> None:
    """The card's `model-index`: one result per task (lm-eval's task name as the dataset)."""
    from huggingface_hub import EvalResult, ModelCard

    readme = folder / "README.md"
    card = ModelCard.load(readme) if readme.is_file() else ModelCard("---\n---\n")
    metric = spec.metric.split(",")[0]
    shots = out.get("n-shot", {})
    card.data.eval_results = [
        EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric,
                   metric_value=value, metric_name=f"{spec.metric} ({shots.get(task, '?')}-shot"
                                                   f"{f', limit {spec.limit}' if spec.limit else ''})",
                   source_name="lm-evaluation-harness",
                   source_url="https://github.com/EleutherAI/lm-evaluation-harness")
        for task, value in scores.items()]
    if not card.data.model_name:
        card.data.model_name = folder.name
    card.save(readme)
