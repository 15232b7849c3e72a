"""The `from_pretrained`-style Python API: thin layers over `merge`, `check` and `push`."""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any, Sequence

from ._options import check_options, evaluation_options
from .compatibility import CompatibilityReport
from .config import AmeConfig
from .errors import InvalidConfigError
from .evaluation import check_scorable, evaluate_model, load_data, metric_for, task_for_models
from .full_models import FullModels, fetch_models, resolve_models
from .inputs import InputStage
from .lm_harness import data_or_tasks
from .merging import merge
from .output import clean_up_temp_dirs, process_temp_dir, remove_temp_dir
from .push import upload_output
from .records import Evaluation, MergeResult, PushInfo

# The scratch folders of `from_pretrained`'s merges (`output.process_temp_dir`).
MODEL_DIR_PREFIX = "ame-hf-model-"


def check(ingredients: Sequence[str | os.PathLike], *, token: str | None = None, dtype: str = "auto",
          pivot: str | int | os.PathLike | None = None, variant: str | None = None,
          base: str | os.PathLike | None = None,
          tokenizer_source: str | int | os.PathLike = "auto") -> CompatibilityReport:
    """Report whether the ingredients can be merged with these options; never raises for a mismatch.

    For Hub repos only their config, tokenizer and side files and their safetensors headers are read
    (range requests): no weight is downloaded (except for `.bin`-only repos, which have no header).
    Every option means what it means in `merge`.

    Args:
        ingredients: local directories and/or Hub repo IDs (`org/name[@revision]`).
        token: Hub token for private or gated repos.
        dtype: the output dtype you will merge with: under `auto` ingredients of different dtypes are an
            error, with a dtype named they are a note.
        pivot: `mean` (the default), `first` or an ingredient index (nothing more to check), `base` (the
            adapters' base), or another checkpoint, checked with the ingredients.
        variant: read the weights variant NAME (`model.NAME.safetensors`).
        base: the base model of the PEFT adapters among the ingredients (default: each adapter's own);
            adapters count as the full models they make of it.
        tokenizer_source: `auto`, `union`, `pivot`, `first`, an ingredient index or a checkpoint: whether the
            output's tokenizer fits the merged vocabulary is part of the check.

    Returns:
        The `CompatibilityReport`: `ok`, `errors` (every difference), `notes`.

    Raises:
        InvalidConfigError: an invalid option (before anything is read).
        IngredientNotFoundError, HubError, CheckpointError: a reference that cannot be read.

    >>> report = check(["org/model-a", "org/model-b"])  # doctest: +SKIP
    >>> report.ok, report.errors, report.notes          # doctest: +SKIP
    >>> check(["./lora-a", "./lora-b"], pivot="base", base="org/base-model").ok  # doctest: +SKIP
    True
    """
    refs = [os.fspath(r) for r in ingredients]
    cfg = check_options(refs, dtype=dtype, pivot=pivot, base=base, variant=variant, tokenizer_source=tokenizer_source)
    stage = InputStage(token=token, variant=cfg.variant)
    return stage.check(refs, pivot=cfg.pivot, base=cfg.base, tokenizer_source=cfg.tokenizer_source,
                       allow_dtype_mismatch=cfg.dtype != "auto").report


def evaluate(
    models: Sequence[str | os.PathLike],
    *,
    data: str | os.PathLike | None = None,
    task: str | None = None,
    metric: str | None = None,
    base: str | os.PathLike | None = None,
    token: str | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = False,
    lm_eval_tasks: str | Sequence[str] | None = None,
    lm_eval_include: str | os.PathLike | None = None,
    lm_eval_metric: str | None = None,
    lm_eval_limit: int | None = None,
    lm_eval_num_fewshot: int | None = None,
) -> Evaluation:
    """Score models (merge outputs, local directories or Hub repo IDs) on local data, offline.

    A PEFT LoRA adapter is scored as the full model it makes of its base (what peft's `merge_and_unload()`
    gives): ame-hf's merge writes it into a temporary folder (under TMPDIR), removed once it is scored.

    Args:
        models: what to evaluate, in the order the scores are returned.
        data: JSONL/CSV with `text` (or `image`) and `label` columns, or an image folder `root/<label>/`;
            for text-generation a `.txt` file (one document per line) or JSONL with a `text` field.
        task: `text-classification`, `image-classification` or `text-generation`; default: from the
            models' architecture (`*ForCausalLM` / `*LMHeadModel` -> text-generation).
        metric: a bundled offline metric (`accuracy`, the default, or `macro_f1`) or a local `evaluate`
            metric folder; for text-generation `loss` (the default: mean NLL per token, lower is better)
            or `perplexity`. `evaluation.higher_is_better(metric)` says which way is better.
        base: the base model of the adapters among `models` (default: each adapter's `base_model_name_or_path`).
        token: Hub token for private or gated repos.
        max_length: text-generation: truncate each document to this many tokens (default: the model's limit).
        batch_size: examples per forward pass.
        device: where the models run (text-generation default: the GPU when there is one).
        progress: a progress bar over the batches (text-generation).
        lm_eval_tasks: instead of `data`, lm-evaluation-harness tasks (`NAME[=WEIGHT],...` or a list): the
            score is `lm_eval_metric` averaged over them with their weights (extra: `pip install 'ame-hf[lm-eval]'`).
        lm_eval_include: a folder of local task YAMLs (lm-eval's `--include_path`).
        lm_eval_metric: the metric as lm-eval names it in its results (default `acc,none`; `acc_norm,none`, ...).
        lm_eval_limit: score only the first N documents of each task.
        lm_eval_num_fewshot: few-shot examples per prompt (default: each task's own).

    Returns:
        An `Evaluation` with the task and metric used and `[(model, score)]`.

    Raises:
        InvalidConfigError: a task the models cannot do (before any model is run), unreadable data.
        IncompatibleCheckpointsError: an adapter whose base is not named or does not fit (before any model is run).

    >>> evaluate(["merged", "org/model-a"], data="val.jsonl").scores  # doctest: +SKIP
    [('merged', 0.91), ('org/model-a', 0.87)]
    >>> evaluate(["./lora"], data="val.jsonl", base="org/base-model").scores  # doctest: +SKIP
    [('./lora', 0.84)]
    """
    evaluation_options(max_length=max_length, batch_size=batch_size)
    data = data_or_tasks(data, lm_eval_tasks=lm_eval_tasks, lm_eval_include=lm_eval_include,
                         lm_eval_metric=lm_eval_metric, lm_eval_limit=lm_eval_limit,
                         lm_eval_num_fewshot=lm_eval_num_fewshot)
    refs = [os.fspath(m) for m in models]
    resolved = resolve_models(refs, base=base, token=token)  # light files only: every check before a download
    task = task_for_models([(r, m.config) for r, m in zip(refs, resolved)], task)
    dataset = load_data(data, task)
    metric = metric_for(task, metric, dataset)
    check_scorable([m.tokenizer for m in resolved], task)
    fetch_models(resolved)
    with FullModels(resolved, token=token, device=device) as full:
        scores = full.score_each(lambda path: evaluate_model(str(path), dataset, task, metric, max_length=max_length,
                                                             batch_size=batch_size, device=device, progress=progress))
    return Evaluation(task=task, metric=metric, dataset=dataset.name, scores=list(zip(refs, scores)))


def from_pretrained(
    ingredients: Sequence[str | os.PathLike],
    *,
    model_class: Any = None,
    config: AmeConfig | None = None,
    token: str | None = None,
    progress: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    **options: Any,
):
    """Merge the ingredients and load the result as a transformers model, like `from_pretrained`.

    Args:
        ingredients: local directories and/or Hub repo IDs (`org/name[@revision]`).
        model_class: a transformers class (default `AutoModel`), e.g. `AutoModelForCausalLM`.
        config: an `AmeConfig`; keyword `options` (`optimizer="adam"`, `lr=1e-4`, ...) override it.
        token: Hub token for private or gated repos.
        progress: show the merge's progress bar.
        model_kwargs: passed to `model_class.from_pretrained` (never `trust_remote_code`).
        options: `merge`'s keywords (`AmeConfig` fields, `device`, `max_memory`, ...).

    Returns:
        The model, with `model.ame_config` (the resolved `AmeConfig`) and `model.ame_result`
        (the `MergeResult`; its folder, `<tmp>/ame-hf-model-<pid>-*`, holds the card and lives as long as the
        model: it goes with the model, or when the process exits, by Ctrl-C or SIGTERM too; one a killed
        process left goes at the next call).

    Raises:
        InvalidConfigError: an invalid option, or `trust_remote_code` in `model_kwargs`.
        IngredientNotFoundError, CheckpointError, IncompatibleCheckpointsError, HubError: as `merge`.

    >>> from transformers import AutoModelForSequenceClassification
    >>> model = from_pretrained(["org/a", "org/b"], model_class=AutoModelForSequenceClassification,
    ...                         optimizer="adam", relative_lr=0.05)   # doctest: +SKIP
    """
    kwargs = dict(model_kwargs or {})
    if kwargs.pop("trust_remote_code", False):
        raise InvalidConfigError("ame-hf never runs code from a downloaded repo (trust_remote_code)")
    if model_class is None:
        from transformers import AutoModel as model_class  # noqa: N813
    clean_up_temp_dirs(MODEL_DIR_PREFIX)
    folder = process_temp_dir(MODEL_DIR_PREFIX)
    try:
        result = merge(ingredients, folder / "merged", config, token=token, progress=progress, **options)
        model = model_class.from_pretrained(result.path, **kwargs)
    except BaseException:
        remove_temp_dir(folder)
        raise
    model.ame_config = result.config
    model.ame_result = result
    weakref.finalize(model, remove_temp_dir, folder)
    return model


def push_to_hub(
    source: str | os.PathLike | MergeResult | Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> PushInfo:
    """Upload a merge (its folder, a `MergeResult`, or a model from `from_pretrained`) with its card.

    Args:
        source: the merge output folder, a `MergeResult`, or a model from `from_pretrained`.
        repo_id: the target repo, `org/name` (created if missing).
        token: Hub token with write access (default: `HF_TOKEN` or the login cache).
        private: create the repo as private.
        revision: the branch to push to (created if missing).
        create_pr: open a pull request instead of committing.
        commit_message: the commit message.

    Returns:
        A `PushInfo`: the URL of the repo (or of the pull request), the commit now at the head, and whether
        the push changed anything (the Hub may already hold exactly this output). `str(info)` is the URL.

    Raises:
        InvalidConfigError: `repo_id` is no repo ID, or `source` is no ame-hf output.
        PushError: the upload failed; the local output is intact and the message says how to retry.

    >>> push_to_hub("merged", "org/merged", private=True).url  # doctest: +SKIP
    'https://huggingface.co/org/merged'
    """
    if isinstance(source, MergeResult):
        folder = source.path
    elif hasattr(source, "ame_result"):
        folder = source.ame_result.path
    else:
        folder = Path(source)
    return upload_output(folder, repo_id, token=token, private=private, revision=revision,
                         create_pr=create_pr, commit_message=commit_message)
