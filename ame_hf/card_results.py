"""What evaluation and selection add to a model card: the scores in its `model-index` (the Hub's evaluation
results) and a section of its body, put before the card's usage and ingredients. No network calls."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .evaluation import higher_is_better
from .lm_evaluation import perplexity


def _value(metric: str, value: float) -> str:
    # A loss is read more easily beside its perplexity.
    return f"{value:.4f} (perplexity {perplexity(value):.2f})" if metric == "loss" else f"{value:.4f}"


def _results(task: str, dataset: str, metric: str, value: float, split: str | None, name: str | None) -> list[Any]:
    from huggingface_hub import EvalResult

    rows = [(metric, value)] + ([("perplexity", perplexity(value))] if metric == "loss" else [])
    return [EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset, metric_type=m, metric_value=v,
                       dataset_split=split, metric_name=f"{m} ({name})" if name else None) for m, v in rows]


def update_card(directory: str | os.PathLike, results: Sequence[tuple[str, float]], *, task: str,
                dataset: str, metric: str, model_name: str | None = None,
                selected_from: int | None = None, selected_by: str = "`ame-hf tune`",
                test_results: Sequence[tuple[str, float]] | None = None, test_dataset: str | None = None) -> None:
    """Add evaluation results to the card's `model-index` and as a section of its body.

    Args:
        directory: the model folder whose README.md is updated (created if missing).
        results: `[(label, value)]`; the first is the model itself.
        task, dataset, metric: what was measured (a `loss` is shown with its perplexity).
        model_name: the `model-index` name (default: the folder name, unless the card has one).
        selected_from: when the model was chosen among this many candidates on this data (by
            `selected_by`). Without `test_results` the figure is then labelled as the validation score
            used for the selection, which overestimates performance on new data.
        selected_by: what chose the model, as Markdown (`` `ame-hf tune` ``, "the greedy soup").
        test_results: `[(label, value)]` on `test_dataset`, data that played no part in the choice; the
            first is the model itself, and that is the figure put into the `model-index`.
        test_dataset: the name of the held-out data.
    """
    from huggingface_hub import ModelCard

    readme = Path(directory) / "README.md"
    card = ModelCard.load(readme) if readme.is_file() else ModelCard("---\n---\n")
    selection = selected_from is not None
    if test_results:
        card.data.eval_results = _results(task, test_dataset or "test", metric, test_results[0][1], "test",
                                          "held-out data, not used for the selection" if selection else None)
    else:
        card.data.eval_results = _results(task, dataset, metric, results[0][1], "validation" if selection else None,
                                          "validation score used for selection" if selection else None)
    if model_name or not card.data.model_name:
        card.data.model_name = model_name or Path(directory).name
    if selection and "model-selection" not in (card.data.tags or []):
        card.data.tags = [*(card.data.tags or []), "model-selection"]
    table = "\n".join(f"| {label} | {_value(metric, val)} |" for label, val in results)
    better = "higher" if higher_is_better(metric) else "lower"
    if selection:
        marker = _SELECTION_HEADING
        held_out = (f"Scored on `{test_dataset}`, data that played **no part in the choice** (this is the figure "
                    f"in the model-index):\n\n| model | {metric} (test) |\n|---|---|\n"
                    + "\n".join(f"| {label} | {_value(metric, val)} |" for label, val in test_results) + "\n\n"
                    if test_results else
                    f"The figures below are the **validation scores used for the selection**, not an independent "
                    f"evaluation: the best of {selected_from} on one data set overestimates what to expect on new "
                    f"data. Evaluate on held-out data for that (`--test-data`, or `ame-hf evaluate MODEL --data "
                    f"test.jsonl --update-card DIR`).\n\n")
        section = (f"\n{marker}\n\nThis model was **selected by {selected_by}** from {selected_from} candidates "
                   f"on {metric} ({better} is better) on `{dataset}` ({task}). {held_out}"
                   f"| candidate | {metric} (validation) |\n|---|---|\n{table}\n")
        before = ("\n## How to use", "\n## Ingredients", "\n## Reproduce")
    else:
        marker = "## Evaluation results"
        section = (f"\n{marker}\n\n{metric} on `{dataset}` ({task}; {better} is better):\n\n| model | {metric} |"
                   f"\n|---|---|\n{table}\n")
        before = ("\n## Reproduce",)
    ModelCard(_put_section(str(card), marker, section, before)).save(readme)


def add_card_section(directory: str | os.PathLike, heading: str, body: str) -> None:
    """Put a Markdown section (replacing one of the same heading) before the card's "How to use".

    Args:
        directory: the model folder whose README.md is updated (created if missing).
        heading: the section's heading line, e.g. `## Greedy soup`.
        body: the section's Markdown.
    """
    from huggingface_hub import ModelCard

    readme = Path(directory) / "README.md"
    card = ModelCard.load(readme) if readme.is_file() else ModelCard("---\n---\n")
    section = f"\n{heading}\n\n{body.strip()}\n"
    ModelCard(_put_section(str(card), heading, section, ("\n## How to use", "\n## Ingredients"))).save(readme)


_SELECTION_HEADING = "## Selection by `ame-hf tune`"


def _put_section(text: str, heading: str, section: str, before: Sequence[str]) -> str:
    """Replace the section under `heading`, or insert it before the first of `before` found (else at the end)."""
    marker = f"\n{heading}\n"
    if marker in text:
        start = text.index(marker)
        end = text.find("\n## ", start + len(marker))
        return text[:start] + section + (text[end:] if end != -1 else "")
    for anchor in before:
        at = text.find(anchor)
        if at != -1:
            return text[:at] + section + text[at:]
    return text + section
