"""Evaluate models on local data: classifiers through transformers pipelines and `evaluate` metrics,
causal LMs by their per-token loss (`lm_evaluation`) or lm-eval tasks (`lm_harness`); which way each metric is
better. Works offline."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ._quiet import quiet_libraries
from .errors import CheckpointError, InvalidConfigError
from .lm_evaluation import TextData, check_tokenizer, load_texts, mean_token_nll, perplexity
from .lm_harness import LmEvalTasks, check_tasks

logger = logging.getLogger(__name__)

TASKS = ("text-classification", "image-classification", "text-generation")
# Task -> the architecture suffixes of the models that can do it.
_TASK_ARCHITECTURES = {"text-classification": ("ForSequenceClassification",),
                       "image-classification": ("ForImageClassification",),
                       "text-generation": ("ForCausalLM", "LMHeadModel")}
# The metric of each task when none is given.
DEFAULT_METRICS = {"text-classification": "accuracy", "image-classification": "accuracy", "text-generation": "loss"}
# Metrics for which a lower value is better; any other metric is better higher (accuracy, F1, ...). With the
# suffixes below, every metric lm-eval registers as lower-is-better (its `higher_is_better` registry: brier_score,
# word_perplexity, byte_perplexity, bits_per_byte, ...) reads so (tests/test_evaluation.py compares with it).
LOWER_IS_BETTER = ("loss", "perplexity", "nll", "mse", "mae", "rmse", "wer", "cer", "ter")
_LOWER_SUFFIXES = ("_loss", "_error", "_perplexity", "bits_per_byte", "brier_score")
# What text-generation can report: the mean per-token NLL, or its exp.
LM_METRICS = ("loss", "perplexity")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_BUNDLED_METRICS = Path(__file__).parent / "metrics"
# Per-example scores: (numerators, denominators), the score being sum(numerators) / sum(denominators): for
# `accuracy` 1.0/0.0 per example over 1.0, for `loss`/`perplexity` the summed NLL per document over its
# predicted tokens (perplexity is exp of that); for lm-eval tasks each document's value times its weight over its
# weight (see `_lm_eval_examples`). What `guard` compares two models on, example by example.
PerExample = tuple[list[float], list[float]]


@dataclass(frozen=True)
class LabelledData:
    """Labelled examples: `inputs` (texts or image paths) and `labels` (ints or label names)."""

    name: str
    inputs: list[Any]
    labels: list[Any]

    def __len__(self) -> int:
        return len(self.labels)


def _architectures(model_config: dict[str, Any]) -> list[str]:
    return [str(a) for a in model_config.get("architectures") or []]


def infer_task(model_config: dict[str, Any]) -> str | None:
    """The evaluation task a model's architecture does, from its `config.json` content.

    Args:
        model_config: the model's config as a dict (`config.json`, or `PretrainedConfig.to_dict()`).

    Returns:
        `text-classification` for `*ForSequenceClassification`, `image-classification` for
        `*ForImageClassification`, `text-generation` for `*ForCausalLM` / `*LMHeadModel`, or None.

    >>> infer_task({"architectures": ["BertForSequenceClassification"]})
    'text-classification'
    >>> infer_task({"architectures": ["LlamaForCausalLM"]})
    'text-generation'
    >>> infer_task({"architectures": ["BertModel"]}) is None
    True
    """
    for arch in _architectures(model_config):
        for task, suffixes in _TASK_ARCHITECTURES.items():
            if arch.endswith(suffixes):
                return task
    return None


def default_metric(task: str, metric: str | None = None) -> str:
    """`metric`, or the task's default (`accuracy` for classification, `loss` for text-generation).

    Raises:
        InvalidConfigError: text-generation with a metric other than `loss` or `perplexity`.

    >>> default_metric("text-generation"), default_metric("text-classification", "macro_f1")
    ('loss', 'macro_f1')
    """
    if metric is None:
        return DEFAULT_METRICS.get(task, "accuracy")
    if task == "text-generation" and metric not in LM_METRICS:
        raise InvalidConfigError(f"metric={metric!r} does not apply to text-generation; use one of: "
                                 f"{', '.join(LM_METRICS)}", field="metric")
    return metric


def metric_for(task: str, metric: str | None, data: Any) -> str:
    """The metric of a score on `data`: an `LmEvalTasks`' own (`--lm-eval-metric`), else `default_metric`.

    Raises:
        InvalidConfigError: `metric` given with lm-eval tasks (their metric is `lm_eval_metric`).
    """
    if isinstance(data, LmEvalTasks):
        if metric is not None and metric != data.metric:
            raise InvalidConfigError("with lm-eval tasks the metric is lm_eval_metric (e.g. acc_norm,none), not metric",
                                     fields=("metric", "lm_eval_metric"))
        return data.metric
    return default_metric(task, metric)


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` is better (`accuracy`: yes; `loss`, `perplexity`: no).

    >>> higher_is_better("accuracy"), higher_is_better("loss")
    (True, False)
    """
    name = Path(str(metric)).name.lower().split(",")[0]  # lm-eval's `acc,none`: the metric, then its filter
    return not (name in LOWER_IS_BETTER or name.endswith(_LOWER_SUFFIXES))


def is_better(a: float, b: float, metric: str) -> bool:
    """True when score `a` is strictly better than `b` for `metric` (direction-aware)."""
    return a > b if higher_is_better(metric) else a < b


def sort_key(score: float, metric: str) -> float:
    """A key under which larger is better for any metric (the score, or minus a loss)."""
    return score if higher_is_better(metric) else -score


def check_task_fits(model_config: dict[str, Any], task: str, name: str) -> None:
    """Refuse a task that the model's architecture cannot do, before any work starts.

    A config without `architectures` is let through: nothing says it cannot (the pipeline decides).

    Args:
        model_config: the model's config as a dict.
        task: an evaluation task (one of `TASKS`).
        name: the model as the user named it, for the message.

    Raises:
        InvalidConfigError: an unknown task, or an architecture that cannot do it (e.g. a
            `LlamaForCausalLM` with `text-classification`).

    >>> check_task_fits({"architectures": ["LlamaForCausalLM"]}, "text-classification", "org/m")  # doctest: +SKIP
    InvalidConfigError: org/m is a LlamaForCausalLM, which cannot do text-classification ...
    """
    if task not in TASKS:
        raise InvalidConfigError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    archs = _architectures(model_config)
    suffixes = _TASK_ARCHITECTURES[task]
    if archs and not any(a.endswith(suffixes) for a in archs):
        raise InvalidConfigError(
            f"{name} is a {', '.join(archs)}, which cannot do {task} (that needs a "
            f"{' or '.join('*' + s for s in suffixes)} model); evaluation supports: {_task_list()}"
        )


def _task_list() -> str:
    return ", ".join(f"{task} ({'/'.join('*' + s for s in suffixes)})" for task, suffixes in _TASK_ARCHITECTURES.items())


def task_for_models(models: Sequence[tuple[str, dict[str, Any]]], task: str | None) -> str:
    """The task to evaluate `models` (`[(name, config)]`) on: `task` checked against every one, or,
    when None, inferred from their architectures (they must agree).

    Raises:
        InvalidConfigError: the task does not fit a model, or cannot be inferred (one line naming
            the model and the valid tasks).
    """
    if task is None:
        # From the first model (for `merge --eval-data` and `tune`, the ingredients); the others
        # must then fit it, so a mixed list fails on the one that differs.
        name, config = models[0]
        task = infer_task(config)
        if task is None:
            archs = ", ".join(_architectures(config)) or "no architectures in config.json"
            raise InvalidConfigError(f"cannot infer the task for {name} ({archs}); pass task=NAME with one of: "
                                     f"{_task_list()}", field="task")
    for name, config in models:
        check_task_fits(config, task, name)
    return task


def check_scorable(paths: Sequence[str | os.PathLike], task: str) -> None:
    """Before any work: for text-generation, every local model folder must hold its tokenizer.

    Raises:
        InvalidConfigError: a local folder without tokenizer files.
    """
    if task == "text-generation":
        for path in paths:
            check_tokenizer(path)


def load_data(path: str | os.PathLike | LmEvalTasks, task: str) -> LabelledData | TextData | LmEvalTasks:
    """Read a JSONL/CSV file (`text` or `image`, and `label` columns) or an image folder
    (`root/<label>/<image>`); for text-generation, a `.txt` file (one document per line) or JSONL (`text`).
    `LmEvalTasks` are returned as they are once checked (`lm_harness.check_tasks`).

    Raises:
        InvalidConfigError: the file is missing, unreadable or lacks the needed columns.
    """
    if isinstance(path, LmEvalTasks):
        return check_tasks(path, task, higher_is_better)
    if task not in TASKS:
        raise InvalidConfigError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if task == "text-generation":
        return load_texts(path)
    path = Path(path)
    if not path.exists():
        raise InvalidConfigError(f"data={str(path)!r} does not exist", field="data")
    if path.is_dir():
        if task != "image-classification":
            raise InvalidConfigError(f"data={str(path)!r} is a folder; a folder of images needs "
                                     "task='image-classification'", fields=("data", "task"))
        inputs, labels = [], []
        for label_dir in sorted(p for p in path.iterdir() if p.is_dir()):
            for image in sorted(label_dir.iterdir()):
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    inputs.append(str(image))
                    labels.append(label_dir.name)
        if not inputs:
            raise InvalidConfigError(f"data={str(path)!r}: no images found in {path}/<label>/ folders", field="data")
        return LabelledData(path.name, inputs, labels)
    rows = _read_rows(path)
    column = "text" if task == "text-classification" else "image"
    if not rows or column not in rows[0] or "label" not in rows[0]:
        raise InvalidConfigError(f"data={str(path)!r}: every row needs `{column}` and `label` fields", field="data")
    inputs = [r[column] if column == "text" else str((path.parent / r[column]).resolve()) for r in rows]
    return LabelledData(path.stem, inputs, [r["label"] for r in rows])


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise InvalidConfigError(f"data={str(path)!r} cannot be read as {'CSV' if path.suffix == '.csv' else 'JSONL'}: "
                                 f"{err}", field="data") from err


def load_metric(name: str):
    """A bundled offline metric (`accuracy`, `macro_f1`), a local metric folder, or `evaluate.load(name)`."""
    import evaluate

    bundled = _BUNDLED_METRICS / name
    target = str(bundled) if (bundled / f"{name}.py").is_file() else name
    try:
        return evaluate.load(target)
    except Exception as err:
        raise InvalidConfigError(
            f"cannot load metric {name!r} ({type(err).__name__}); bundled offline metrics: accuracy, macro_f1, "
            "or give a local evaluate metric folder"
        ) from err


def _label_id(label: Any, label2id: dict[str, int]) -> int:
    if isinstance(label, int):
        return label
    text = str(label)
    if text in label2id:
        return label2id[text]
    if text.lstrip("-").isdigit():
        return int(text)
    raise InvalidConfigError(f"label {text!r} is not one of the model's labels {sorted(label2id)}")


def predict(model: Any, data: LabelledData, task: str, batch_size: int = 32, device: str | None = None) -> list[int]:
    """Class ids predicted by a transformers pipeline for every example (on the CPU unless `device`)."""
    from transformers import pipeline

    kwargs: dict[str, Any] = {"model": model, "device": device or "cpu"}
    if isinstance(model, (str, os.PathLike)):
        kwargs["model"] = str(model)
    elif task == "text-classification" and getattr(model, "name_or_path", None):
        kwargs["tokenizer"] = model.name_or_path  # a model built in memory (`in_memory`): its tokenizer's folder
    try:
        pipe = pipeline(task, **kwargs)
    except Exception as err:
        raise CheckpointError(f"cannot build a {task} pipeline for {model} ({type(err).__name__}: {err})") from err
    label2id = {str(k): int(v) for k, v in (pipe.model.config.label2id or {}).items()}
    outputs = pipe(list(data.inputs), batch_size=batch_size, top_k=1)
    preds = []
    for out in outputs:
        best = out[0] if isinstance(out, list) else out
        preds.append(_label_id(best["label"], label2id))
    return preds


def evaluate_model(model: Any, data: LabelledData | TextData | LmEvalTasks, task: str, metric: str | None = None, *,
                   max_length: int | None = None, batch_size: int | None = None, device: str | None = None,
                   progress: bool = False, per_example: list[PerExample] | None = None) -> float:
    """The metric's main value for one model (a directory or a loaded transformers model).

    Args:
        model: a model directory or a loaded transformers model.
        data: from `load_data` for this task.
        task: one of `TASKS`.
        metric: default `default_metric(task)`; for text-generation `loss` (mean NLL per token) or `perplexity`.
        max_length: text-generation: truncate documents to this many tokens.
        batch_size: examples per forward pass (default 32 for pipelines, 8 documents for text-generation).
        device: where the model runs (text-generation default: CUDA when available; pipelines: the CPU).
        progress: text-generation: a progress bar over the batches. False also keeps transformers and
            huggingface_hub quiet while the model loads and runs (no "Loading weights" bars, no advisory
            warnings; `quiet_libraries`), and leaves their settings as they were.
        per_example: a list that receives the per-example scores the score is made of (`PerExample`, in the data's
            order) where the metric is a mean over examples (`accuracy`, `loss`, `perplexity`, an lm-eval metric
            aggregated as a mean over documents: see `_lm_eval_examples`); for another lm-eval metric, a line
            saying why there are none (a `str`); nothing for other metrics (`macro_f1`). `tune`'s selection rule
            compares them (`guard`).

    Returns:
        The score (see `higher_is_better(metric)` for its direction).
    """
    with quiet_libraries(not progress):
        value, each = _evaluate_model(model, data, task, metric, max_length=max_length, batch_size=batch_size,
                                      device=device, progress=progress, examples=per_example is not None)
    if per_example is not None and each is not None:
        per_example.append(each)
    return value


def _evaluate_model(model: Any, data: LabelledData | TextData | LmEvalTasks, task: str, metric: str | None, *,
                    max_length: int | None, batch_size: int | None, device: str | None,
                    progress: bool, examples: bool = False) -> tuple[float, PerExample | str | None]:
    from transformers import AutoConfig

    if isinstance(data, LmEvalTasks):
        from .lm_harness import score

        got: list[PerExample | str] = []
        value = score(model, data, device=device, batch_size=batch_size, max_length=max_length, progress=progress,
                      per_example=got if examples else None)
        return value, got[0] if got else None
    metric = default_metric(task, metric)
    if task == "text-generation":
        if not isinstance(data, TextData):
            raise InvalidConfigError("text-generation needs text documents (load_data(path, 'text-generation'))")
        docs: list[tuple[float, int]] = []
        loss, _ = mean_token_nll(model, data, max_length=max_length, batch_size=batch_size or 8, device=device,
                                 progress=progress, per_document=docs)
        each = ([nll for nll, _ in docs], [float(n) for _, n in docs])
        return (perplexity(loss) if metric == "perplexity" else loss), each
    predictions = predict(model, data, task, batch_size=batch_size or 32, device=device)
    config = model.config if hasattr(model, "config") else AutoConfig.from_pretrained(str(model))
    label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
    references = [_label_id(label, label2id) for label in data.labels]
    result = load_metric(metric).compute(predictions=predictions, references=references)
    each = ([float(p == r) for p, r in zip(predictions, references)], [1.0] * len(references))
    return float(result.get(metric, next(iter(result.values())))), each if metric == "accuracy" else None
