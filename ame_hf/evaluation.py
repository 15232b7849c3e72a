"""Evaluate models on local labelled data with transformers pipelines and `evaluate` metrics,
and write the results into a model card's `model-index`. Works offline."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import CheckpointError, InvalidConfigError

logger = logging.getLogger(__name__)

TASKS = ("text-classification", "image-classification")
# Task -> the architecture suffix of the models whose pipeline can do it.
_TASK_ARCHITECTURES = {"text-classification": "ForSequenceClassification",
                       "image-classification": "ForImageClassification"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_BUNDLED_METRICS = Path(__file__).parent / "metrics"


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
        `*ForImageClassification`, or None when the architecture does neither.

    >>> infer_task({"architectures": ["BertForSequenceClassification"]})
    'text-classification'
    >>> infer_task({"architectures": ["LlamaForCausalLM"]}) is None
    True
    """
    for arch in _architectures(model_config):
        for task, suffix in _TASK_ARCHITECTURES.items():
            if arch.endswith(suffix):
                return task
    return None


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
    suffix = _TASK_ARCHITECTURES[task]
    if archs and not any(a.endswith(suffix) for a in archs):
        raise InvalidConfigError(
            f"{name} is a {', '.join(archs)}, which cannot do {task} (that needs a *{suffix} model); "
            f"evaluation supports: {_task_list()}"
        )


def _task_list() -> str:
    return ", ".join(f"{task} (*{suffix})" for task, suffix in _TASK_ARCHITECTURES.items())


def read_model_config(path: str | os.PathLike, name: str) -> dict[str, Any]:
    """The `config.json` of a local model directory as a dict.

    Raises:
        CheckpointError: no readable `config.json` in `path`.
    """
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{name}: cannot read {file} ({type(err).__name__})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{name}: {file} must hold a JSON object")
    return config


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
            raise InvalidConfigError(f"cannot infer --task for {name} ({archs}); pass --task with one of: "
                                     f"{_task_list()}")
    for name, config in models:
        check_task_fits(config, task, name)
    return task


def load_data(path: str | os.PathLike, task: str) -> LabelledData:
    """Read a JSONL/CSV file (`text` or `image`, and `label` columns) or an image folder
    (`root/<label>/<image>`).

    Raises:
        InvalidConfigError: the file is missing, unreadable or lacks the needed columns.
    """
    if task not in TASKS:
        raise InvalidConfigError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    path = Path(path)
    if not path.exists():
        raise InvalidConfigError(f"--data {path} does not exist")
    if path.is_dir():
        if task != "image-classification":
            raise InvalidConfigError(f"--data {path} is a folder; a folder of images needs --task image-classification")
        inputs, labels = [], []
        for label_dir in sorted(p for p in path.iterdir() if p.is_dir()):
            for image in sorted(label_dir.iterdir()):
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    inputs.append(str(image))
                    labels.append(label_dir.name)
        if not inputs:
            raise InvalidConfigError(f"--data {path}: no images found in {path}/<label>/ folders")
        return LabelledData(path.name, inputs, labels)
    rows = _read_rows(path)
    column = "text" if task == "text-classification" else "image"
    if not rows or column not in rows[0] or "label" not in rows[0]:
        raise InvalidConfigError(f"--data {path}: every row needs `{column}` and `label` fields")
    inputs = [r[column] if column == "text" else str((path.parent / r[column]).resolve()) for r in rows]
    return LabelledData(path.stem, inputs, [r["label"] for r in rows])


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise InvalidConfigError(f"--data {path} cannot be read as {'CSV' if path.suffix == '.csv' else 'JSONL'}: {err}") from err


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


def predict(model: Any, data: LabelledData, task: str, batch_size: int = 32) -> list[int]:
    """Class ids predicted by a transformers pipeline for every example."""
    from transformers import pipeline

    kwargs: dict[str, Any] = {"model": model, "device": "cpu"}
    if isinstance(model, (str, os.PathLike)):
        kwargs["model"] = str(model)
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


def evaluate_model(model: Any, data: LabelledData, task: str, metric: str = "accuracy") -> float:
    """The metric's main value for one model (a directory or a loaded transformers model)."""
    from transformers import AutoConfig

    predictions = predict(model, data, task)
    config = model.config if hasattr(model, "config") else AutoConfig.from_pretrained(str(model))
    label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
    references = [_label_id(label, label2id) for label in data.labels]
    result = load_metric(metric).compute(predictions=predictions, references=references)
    return float(result.get(metric, next(iter(result.values()))))
