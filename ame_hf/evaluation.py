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
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_BUNDLED_METRICS = Path(__file__).parent / "metrics"


@dataclass(frozen=True)
class Dataset:
    """Labelled examples: `inputs` (texts or image paths) and `labels` (ints or label names)."""

    name: str
    inputs: list[Any]
    labels: list[Any]

    def __len__(self) -> int:
        return len(self.labels)


def load_data(path: str | os.PathLike, task: str) -> Dataset:
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
        return Dataset(path.name, inputs, labels)
    rows = _read_rows(path)
    column = "text" if task == "text-classification" else "image"
    if not rows or column not in rows[0] or "label" not in rows[0]:
        raise InvalidConfigError(f"--data {path}: every row needs `{column}` and `label` fields")
    inputs = [r[column] if column == "text" else str((path.parent / r[column]).resolve()) for r in rows]
    return Dataset(path.stem, inputs, [r["label"] for r in rows])


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise InvalidConfigError(f"--data {path} cannot be read as {'CSV' if path.suffix == '.csv' else 'JSONL'}: {err}") from None


def load_metric(name: str):
    """A bundled offline metric (`accuracy`, `f1`), a local metric folder, or `evaluate.load(name)`."""
    import evaluate

    bundled = _BUNDLED_METRICS / name
    target = str(bundled) if (bundled / f"{name}.py").is_file() else name
    try:
        return evaluate.load(target)
    except Exception as err:
        raise InvalidConfigError(
            f"cannot load metric {name!r} ({type(err).__name__}); bundled offline metrics: accuracy, f1, "
            "or give a local evaluate metric folder"
        ) from None


def _label_id(label: Any, label2id: dict[str, int]) -> int:
    if isinstance(label, int):
        return label
    text = str(label)
    if text in label2id:
        return label2id[text]
    if text.lstrip("-").isdigit():
        return int(text)
    raise InvalidConfigError(f"label {text!r} is not one of the model's labels {sorted(label2id)}")


def predict(model: Any, data: Dataset, task: str, batch_size: int = 32) -> list[int]:
    """Class ids predicted by a transformers pipeline for every example."""
    from transformers import pipeline

    kwargs: dict[str, Any] = {"model": model, "device": "cpu"}
    if isinstance(model, (str, os.PathLike)):
        kwargs["model"] = str(model)
    try:
        pipe = pipeline(task, **kwargs)
    except Exception as err:
        raise CheckpointError(f"cannot build a {task} pipeline for {model} ({type(err).__name__}: {err})") from None
    label2id = {str(k): int(v) for k, v in (pipe.model.config.label2id or {}).items()}
    outputs = pipe(list(data.inputs), batch_size=batch_size, top_k=1)
    preds = []
    for out in outputs:
        best = out[0] if isinstance(out, list) else out
        preds.append(_label_id(best["label"], label2id))
    return preds


def evaluate_model(model: Any, data: Dataset, task: str, metric: str = "accuracy") -> float:
    """The metric's main value for one model (a directory or a loaded transformers model)."""
    from transformers import AutoConfig

    predictions = predict(model, data, task)
    config = model.config if hasattr(model, "config") else AutoConfig.from_pretrained(str(model))
    label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
    references = [_label_id(label, label2id) for label in data.labels]
    result = load_metric(metric).compute(predictions=predictions, references=references)
    return float(result.get(metric, next(iter(result.values()))))


def update_card(directory: str | os.PathLike, results: Sequence[tuple[str, float]], *, task: str,
                dataset: str, metric: str, model_name: str | None = None) -> None:
    """Add evaluation results (`[(label, value)]`, the first is the model itself) to the card's
    `model-index` and an Evaluation section."""
    from huggingface_hub import EvalResult, ModelCard

    readme = Path(directory) / "README.md"
    card = ModelCard.load(readme) if readme.is_file() else ModelCard("---\n---\n")
    value = results[0][1]
    card.data.eval_results = [EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset,
                                         metric_type=metric, metric_value=value)]
    if model_name or not card.data.model_name:
        card.data.model_name = model_name or Path(directory).name
    table = "\n".join(f"| {label} | {val:.4f} |" for label, val in results)
    section = (f"\n## Evaluation results\n\n{metric} on `{dataset}` ({task}):\n\n| model | {metric} |\n|---|---|\n"
               f"{table}\n")
    text = str(card)
    marker = "\n## Evaluation results\n"
    if marker in text:
        start = text.index(marker)
        end = text.find("\n## ", start + len(marker))
        text = text[:start] + section + (text[end:] if end != -1 else "")
    else:
        repro = text.find("\n## Reproduce")
        text = text[:repro] + section + text[repro:] if repro != -1 else text + section
    ModelCard(text).save(readme)
