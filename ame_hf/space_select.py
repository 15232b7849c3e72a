"""The Space's validation-driven parts without Gradio: Evaluate and Tune (`ame_hf.evaluate`, `ame_hf.tune`) and
their Markdown, with the form rules every part of the Space shares (reference lists, the local-path rule)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ._space_lm_eval import lm_eval_keywords
from .errors import InvalidConfigError
from .evaluation import LM_METRICS, TASKS, higher_is_better, load_data
from .lm_evaluation import perplexity

if TYPE_CHECKING:
    from .config import AmeConfig
    from .records import Evaluation
    from .tuning import TuneResult

__all__ = ["TuneView", "card_markdown", "evaluation_markdown", "form_config", "parse_ingredients", "refuse_local_paths",
           "run_evaluate", "run_tune", "scores_markdown", "tune_summary"]

# The task box's choices: "auto" lets the models' architecture decide, as `--task` left out does.
TASK_CHOICES = ("auto", *TASKS)
# Progress callback: (fraction done, description).
Progress = Callable[[float, str], None]


def parse_ingredients(text: str | None) -> list[str]:
    """The references of a text box.

    Args:
        text: one reference a line (`org/name`, `org/name@revision`); blank lines are ignored.

    Returns:
        The references, stripped, in order.

    >>> parse_ingredients(" org/a\\n\\norg/b@v1 \\n")
    ['org/a', 'org/b@v1']
    """
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def refuse_local_paths(refs: Sequence[str]) -> None:
    """Refuse anything that names the server's disk instead of a Hub repo.

    On a public Space a local path would read the server's disk, e.g. another visitor's private download in
    the shared Hub cache; Hub references are always checked against the Hub's access rules.

    Args:
        refs: the references to check.

    Raises:
        InvalidConfigError: one names a local path (absolute, relative, `~`, or an existing file or folder).
    """
    for ref in refs:
        if ref.startswith(("/", ".", "~")) or Path(ref).expanduser().exists():
            raise InvalidConfigError(
                f"{ref}: local paths are disabled in this app; give Hub repo IDs (org/name[@revision])")


def form_config(refs: Sequence[str], options: dict[str, Any], *, allow_local_paths: bool = True) -> AmeConfig:
    """The form's `AmeConfig` options as the library validates them; blank boxes mean the default.

    Args:
        refs: the ingredients (checked for local paths with the references among the options).
        options: `AmeConfig` keywords and the form's values (text, numbers, ticks).
        allow_local_paths: accept local directories as pivot, tokenizer source or base (False on a public Space).

    Returns:
        The validated config.

    Raises:
        InvalidConfigError: what `AmeConfig.from_dict` refuses (one line, naming the keyword), or a local path
            where they are disabled.
    """
    from .config import AmeConfig

    values = {key: value.strip() if isinstance(value, str) else value for key, value in options.items()}
    config = AmeConfig.from_dict({key: value for key, value in values.items() if value is not None and value != ""})
    if not allow_local_paths:
        refuse_local_paths([*refs, *config.pivot_refs, *config.tokenizer_refs, *([config.base] if config.base else [])])
    return config


def card_markdown(readme: str) -> str:
    """A model card for display: its YAML metadata as a code block (Markdown would render it as text).

    Args:
        readme: the card's text (README.md).

    Returns:
        Markdown.

    >>> print(card_markdown("---\\nlicense: mit\\n---\\n# Title\\n"))
    ```yaml
    license: mit
    ```
    <BLANKLINE>
    # Title
    <BLANKLINE>
    """
    if readme.startswith("---\n"):
        meta, sep, body = readme[4:].partition("\n---\n")
        if sep:
            return f"```yaml\n{meta.strip()}\n```\n\n{body.lstrip()}"
    return readme


def _offline_metrics() -> set[str]:
    # The metrics that run no code from outside ame-hf: those it ships, and the language model's own loss.
    # Any other name goes to `evaluate.load`, which runs a metric script from the Hub or a local folder.
    bundled = {p.name for p in resources.files("ame_hf.metrics").iterdir() if p.is_dir() and not p.name.startswith("_")}
    return bundled | set(LM_METRICS)


def _whole(value: Any, what: str, default: int | None, minimum: int) -> int | None:
    """A number box's value as a whole number (blank: `default`); gradio_client may send any JSON."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer() or number < minimum:
        raise InvalidConfigError(f"{what} must be a whole number >= {minimum}, got {value!r}")
    return int(number)


def _selection_inputs(task: str | None, metric: str | None, max_length: Any, data: Sequence[Any],
                      allow_local_paths: bool) -> tuple[str | None, str | None, int | None]:
    """The form's task, metric and max length as `evaluate`/`tune` take them; the data files checked."""
    task = None if not task or task == "auto" else task
    if task is not None and task not in TASKS:
        raise InvalidConfigError(f"unknown task {task!r}; choose one of: {', '.join(TASK_CHOICES)}")
    metric = (metric or "").strip() or None
    length = _whole(max_length, "max length", None, 0) or None  # 0: the model's limit
    if not allow_local_paths:
        if metric is not None and metric not in _offline_metrics():
            raise InvalidConfigError(f"metric {metric!r} is not available in this app; choose one of: "
                                     f"{', '.join(sorted(_offline_metrics()))} (blank: the task's default)")
        if task in (None, "image-classification"):
            for file in filter(None, data):
                _refuse_server_images(file)
    return task, metric, length


def _refuse_server_images(file: str | Path) -> None:
    # An uploaded JSONL/CSV of image-classification names image files, which would be read from the server.
    try:
        load_data(file, "image-classification")
    except InvalidConfigError:
        return  # no `image` column: text data
    raise InvalidConfigError(f"{Path(file).name}: image files named in the data are on the server's disk; "
                             "local paths are disabled in this app (text-classification and text-generation work)")


def _refs(text: str | None, what: str, allow_local_paths: bool) -> list[str]:
    refs = parse_ingredients(text)
    if not refs:
        raise InvalidConfigError(f"give at least one {what}: a Hub repo ID (org/name[@revision]) per line")
    if not allow_local_paths:
        refuse_local_paths(refs)
    return refs


def _base(text: str | None, allow_local_paths: bool) -> str | None:
    """The form's base model for LoRA adapters (blank: each adapter's own `base_model_name_or_path`)."""
    base = (text or "").strip() or None
    if base is not None and not allow_local_paths:
        refuse_local_paths([base])
    return base


def run_evaluate(models: str | None, data: str | Path | None, task: str | None = "auto", metric: str | None = None,
                 max_length: Any = None, token: str | None = None, *, base: str | None = None,
                 batch_size: Any = None, lm_eval: Mapping[str, Any] | None = None,
                 allow_local_paths: bool = True) -> Evaluation:
    """Score the models (one a line) on the uploaded data with `ame_hf.evaluate`.

    Blank boxes mean the default: `task` "auto" (from the models' architecture), the task's metric, and (blank
    or 0) the model's length limit.

    Args:
        models: the form's text, one reference a line.
        data: the uploaded data file.
        task, metric, max_length: the form's boxes.
        token: Hub token.
        base: the base model of LoRA adapters among the models (blank: each adapter's own).
        batch_size: the evaluation's batch size (blank or 0: the default).
        lm_eval: the lm-eval boxes by keyword, the score instead of `data` when tasks are named
            (`_space_lm_eval.lm_eval_keywords`).
        allow_local_paths: accept local directories, metric scripts and task folders (False on a public Space).

    Returns:
        The library's `Evaluation`.

    Raises:
        AmeError: no models or data, a local path where they are disabled, a task or metric that does not fit.
    """
    import ame_hf

    refs = _refs(models, "model", allow_local_paths)
    lm = lm_eval_keywords(lm_eval, allow_local_paths=allow_local_paths)
    if not data and "lm_eval_tasks" not in lm:
        raise InvalidConfigError("upload the data to score on (JSONL/CSV with text and label; .txt for "
                                 "text-generation), or name lm-eval tasks")
    task, metric, length = _selection_inputs(task, metric, max_length, [data], allow_local_paths)
    batch = _whole(batch_size, "batch_size", None, 0) or None  # 0: the default
    return ame_hf.evaluate(refs, data=data or None, task=task, metric=metric, token=token, max_length=length,
                           base=_base(base, allow_local_paths), batch_size=batch, **lm)


def scores_markdown(rows: Sequence[tuple[str, float]], metric: str, what: str = "model") -> str:
    """`rows` as a Markdown table whose header names the metric and its direction (a loss with its perplexity).

    Args:
        rows: `(label, value)` in the order to show.
        metric: the metric of the values.
        what: the first column's header.

    Returns:
        Markdown.

    >>> print(scores_markdown([("soup", 0.91), ("ingredient 0", 0.87)], "accuracy"))
    | model | accuracy (higher is better) |
    |---|---|
    | soup | 0.9100 |
    | ingredient 0 | 0.8700 |
    >>> print(scores_markdown([("soup", 2.0)], "loss").splitlines()[-1])
    | soup | 2.0000 | 7.389 |
    """
    ppl = metric == "loss"
    head = f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)"
    lines = [f"| {what} | {head} |" + (" perplexity |" if ppl else ""), "|---|---|" + ("---|" if ppl else "")]
    lines += [f"| {_cell(label)} | {value:.4f} |" + (f" {perplexity(value):.3f} |" if ppl else "")
              for label, value in rows]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def evaluation_markdown(result: Evaluation) -> str:
    """The scores best first (direction-aware; equals keep the given order), on which data and metric.

    Args:
        result: what `ame_hf.evaluate` returned.

    Returns:
        Markdown: a line and a numbered table.
    """
    sign = 1 if higher_is_better(result.metric) else -1
    rows = sorted(result.scores, key=lambda row: -sign * row[1])
    return (f"**{result.task}** on `{result.dataset}`, best first:\n\n"
            + scores_markdown([(f"{i + 1}. {ref}", value) for i, (ref, value) in enumerate(rows)], result.metric))


@dataclass(frozen=True, kw_only=True)
class TuneView:
    """What the app shows after `tune`; `folder` (the selected model) is what Push uploads, as after a merge.

    Attributes:
        folder: the selected model's output.
        result: what `ame_hf.tune` returned.
        card_markdown: its model card, for display.
        config_yaml: its `ame_config.yaml`.
        candidates_markdown: every candidate's validation score, best first.
        summary_markdown: the choice (`tune_summary`).
    """

    folder: Path
    result: TuneResult
    card_markdown: str
    config_yaml: str
    candidates_markdown: str
    summary_markdown: str


def run_tune(ingredients: str | None, data: str | Path | None, test_data: str | Path | None, work_dir: Path,
             token: str | None = None, *, task: str | None = "auto", metric: str | None = None,
             budget: Any = None, max_length: Any = None, base: str | None = None, batch_size: Any = None,
             options: dict[str, Any] | None = None, progress: Progress | None = None,
             lm_eval: Mapping[str, Any] | None = None, allow_local_paths: bool = True) -> TuneView:
    """Select with `ame_hf.tune` into `work_dir/merged` and render the candidates, the choice and the card.

    Blank boxes mean the default: `task` "auto", the task's metric, `budget` the library's `DEFAULT_BUDGET`.

    Args:
        ingredients: the form's text, one reference a line.
        data: the uploaded validation data (the choice).
        test_data: uploaded held-out data (optional; not used to choose).
        work_dir: an empty folder for the output.
        token: Hub token.
        task, metric, budget, max_length: the form's boxes.
        base: the base model of LoRA adapters among the ingredients (blank: each adapter's own).
        batch_size: the evaluation's batch size (blank or 0: the default).
        options: the output options `tune` passes to its merges (`AmeConfig` keywords: dtype, tokenizer_source,
            compute_dtype, max_shard_size, allow_nonfinite, variant), as `form_config` reads them.
        progress: called with (fraction done, description), a step per line `tune` logs.
        lm_eval: the lm-eval boxes, the score instead of `data` when tasks are named (as `run_evaluate`).
        allow_local_paths: accept local directories, metric scripts and task folders (False on a public Space).

    Returns:
        A `TuneView` of the selected model.

    Raises:
        AmeError: as `run_evaluate`, a budget below 0, and whatever `tune` refuses (ingredients that do not merge).
    """
    import ame_hf
    from .tuning import DEFAULT_BUDGET

    refs = _refs(ingredients, "ingredient", allow_local_paths)
    lm = lm_eval_keywords(lm_eval, allow_local_paths=allow_local_paths)
    if not data and "lm_eval_tasks" not in lm:
        raise InvalidConfigError("upload the validation data to select on (JSONL/CSV with text and label; .txt for "
                                 "text-generation), or name lm-eval tasks")
    task, metric, length = _selection_inputs(task, metric, max_length, [data, test_data], allow_local_paths)
    budget = _whole(budget, "budget", DEFAULT_BUDGET, 0)
    base = _base(base, allow_local_paths)
    config = form_config(refs, options or {}, allow_local_paths=allow_local_paths)
    batch = _whole(batch_size, "batch_size", None, 0) or None
    # tune logs a line per ingredient, soup, greedy-soup step and variant (and one time estimate): enough to
    # move a bar; capped, since it is a display only.
    steps = 2 * len(refs) + 2 + budget
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if progress is not None:
            progress(min(len(lines) / steps, 1.0), line.strip())

    if progress is not None:
        progress(0.0, "Downloading the ingredients and scoring them on the validation data")
    result = ame_hf.tune(refs, work_dir / "merged", data=data or None, test_data=test_data or None, task=task,
                         metric=metric, budget=budget, max_length=length, base=base, token=token,
                         config=config, batch_size=batch, progress=False, log=log, **lm)
    return TuneView(
        folder=result.path,
        result=result,
        card_markdown=card_markdown((result.path / "README.md").read_text(encoding="utf-8")),
        config_yaml=(result.path / "ame_config.yaml").read_text(encoding="utf-8"),
        candidates_markdown=scores_markdown([(f"{i + 1}. {c.label}", c.score) for i, c in enumerate(result.candidates)],
                                            result.metric, "candidate (validation)"),
        summary_markdown=tune_summary(result),
    )


def tune_summary(result: TuneResult) -> str:
    """The selected candidate, from how many, and the held-out scores when there were test data.

    Args:
        result: what `ame_hf.tune` returned.

    Returns:
        Markdown.
    """
    better = "higher" if higher_is_better(result.metric) else "lower"
    text = (f"Selected **{_cell(result.best.label)}**: validation {result.metric} **{result.best.score:.4f}** "
            f"({better} is better), chosen from {len(result.candidates)} candidates (the card's *Why this pick* "
            "says why). Validation scores chose it, "
            "so they overestimate what to expect on new data.")
    if result.test_scores:
        text += ("\n\nOn the test data, which played no part in the choice:\n\n"
                 + scores_markdown(sorted(result.test_scores.items(), key=lambda row: row[0] != "selected"),
                                   result.metric, "test"))
    return text
