"""Every model card ame-hf writes: a merge's (from `model_cards/ame_model_card.md`), the evaluation or
selection section added to it, and the card of a `tune` output that is a copy of one ingredient.

Rendered with `huggingface_hub.ModelCard`; no network calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .config import AmeConfig
from .evaluation import higher_is_better
from .lm_evaluation import perplexity
from .optimizers import optimizer_class, reported_hyperparameters
from .recipe import run_yaml, versions

from .records import Ingredient, MergeResult

if TYPE_CHECKING:
    from huggingface_hub import ModelCard, ModelCardData

    from .checkpoint import Checkpoint

logger = logging.getLogger(__name__)

TAGS = ["ame-hf", "merge", "model-ensembling"]
TEMPLATE = "ame_model_card.md"

# Architecture suffix -> (transformers Auto class, pipeline tag). Suffixes cover most models without
# importing transformers (about a second) into every merge; see `_auto_class` for the rest.
_ARCHITECTURES = [
    ("ForCausalLM", "AutoModelForCausalLM", "text-generation"),
    ("LMHeadModel", "AutoModelForCausalLM", "text-generation"),  # GPT2LMHeadModel and its kin
    ("ForSeq2SeqLM", "AutoModelForSeq2SeqLM", "text2text-generation"),
    ("ForImageClassification", "AutoModelForImageClassification", "image-classification"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "AutoModelForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "AutoModelForMaskedLM", "fill-mask"),
    ("ForAudioClassification", "AutoModelForAudioClassification", "audio-classification"),
]
# `*ForConditionalGeneration` is a seq2seq LM, a speech or a vision-language model depending on the
# model: transformers' own task mappings (names only) tell which.
_CONDITIONAL_GENERATION = [
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM", "text2text-generation"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq", "automatic-speech-recognition"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText", "image-text-to-text"),
]
# The placeholder output folder of the Reproduce command.
REPRODUCE_OUT = "merged"


def _auto_class(config: dict[str, Any]) -> tuple[str, str | None]:
    """(transformers Auto class, pipeline tag or None) for a model config; `AutoModel` when unknown."""
    for arch in config.get("architectures") or []:
        arch = str(arch)
        for suffix, auto, tag in _ARCHITECTURES:
            if arch.endswith(suffix):
                return auto, tag
        if arch.endswith("ForConditionalGeneration"):
            try:
                from transformers.models.auto import modeling_auto
            except ImportError:  # pragma: no cover - transformers is a dependency
                break
            for mapping, auto, tag in _CONDITIONAL_GENERATION:
                names = getattr(modeling_auto, mapping, {}).values()
                if any(arch == n or (isinstance(n, tuple) and arch in n) for n in names):
                    return auto, tag
    return "AutoModel", None


def _pipeline_from_architectures(config: dict[str, Any]) -> str | None:
    return _auto_class(config)[1]


def _agreed(values: Sequence[Any]) -> Any:
    """The common value when every ingredient gives the same non-empty one, else None."""
    values = list(values)
    return values[0] if values and values[0] and all(v == values[0] for v in values) else None


def ingredient_card_data(path: Path) -> dict[str, Any]:
    """The YAML metadata of an ingredient's own README.md, read locally; an unreadable card counts as none.

    Args:
        path: the ingredient's folder.

    Returns:
        The metadata as a dict (empty without a card).
    """
    readme = path / "README.md"
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception as err:  # a broken card of an ingredient must not break the merge
        logger.info("ignoring unreadable card %s: %s", readme, err)
        return {}


def reproduce_command(result: "MergeResult", out: str = REPRODUCE_OUT) -> str:
    """The `ame-hf merge` command that recomputes this result's weights, built from what was resolved.

    Ingredients (and a checkpoint pivot) are pinned (`org/name@<sha>`, or the local path as given);
    every option that determines the weights is given with its resolved value, and nothing else
    (no push, token, device or output options). Options equal to the `AmeConfig` default are left
    out, so running it rebuilds an equal config and hence the same bytes.

    Args:
        result: the `MergeResult` of the merge.
        out: the output folder to name in the command.

    Returns:
        A shell command line (quoted with `shlex`).

    >>> reproduce_command(result)  # doctest: +SKIP
    'ame-hf merge org/a@0123... org/b@4567... --out merged --optimizer adam --relative-lr 0.005 --schedule constant'
    """
    cfg = result.config
    args = ["ame-hf", "merge", *(i.pinned_ref for i in result.ingredients), "--out", out,
            "--optimizer", cfg.optimizer]
    # lr / relative_lr and the schedule always: their defaults depend on the optimizer.
    args += ["--relative-lr", repr(cfg.relative_lr)] if cfg.relative_lr is not None else ["--lr", repr(cfg.lr)]
    args += ["--schedule", str(cfg.schedule)]
    defaults = AmeConfig()
    for f in dataclasses.fields(AmeConfig):
        name, value = f.name, getattr(cfg, f.name)
        if name in ("optimizer", "lr", "relative_lr", "schedule") or value == getattr(defaults, name):
            continue
        flag = "--" + name.replace("_", "-")
        if name == "pivot" and hasattr(result.pivot, "pinned_ref"):
            args += [flag, result.pivot.pinned_ref]
        elif name == "optimizer_args":
            args += [flag, json.dumps(dict(value))]
        elif name == "order" and isinstance(value, list):
            args += [flag, ",".join(map(str, value))]
        elif isinstance(value, bool):
            args.append(flag)  # store_true flags; the default is False
        else:
            args += [flag, str(value)]
    return shlex.join(args)


def output_dtype_text(result: "MergeResult", checkpoints: Sequence["Checkpoint"]) -> str:
    """The dtype(s) the weights were written in: the `dtype` option, or the ingredients' under `auto`.

    Args:
        result: the merge's `MergeResult`.
        checkpoints: the opened ingredients (the first one's floating dtypes are the output's under `auto`).

    Returns:
        A phrase for the card, e.g. `bfloat16` or `float32 (the ingredients' dtype)`.
    """
    if result.config.dtype != "auto":
        return result.config.dtype
    found = sorted({str(ckpt.info(n).dtype).removeprefix("torch.") for ckpt in checkpoints[:1]
                    for n in ckpt.names() if ckpt.info(n).dtype.is_floating_point})
    return ", ".join(found) + " (the ingredients' dtype)" if found else "the ingredients' dtype"


def _usage(result: "MergeResult", checkpoints: Sequence["Checkpoint"], pipeline: str | None) -> dict[str, Any]:
    """What the "How to use" section needs: Auto class, a placeholder name, tokenizer or processor."""
    source = result.pivot.path if hasattr(result.pivot, "path") else (
        checkpoints[result.pivot if isinstance(result.pivot, int) else 0].path)
    config = checkpoints[0].config
    auto, tag = _auto_class(config)
    has = lambda *names: any((Path(source) / n).is_file() for n in names)  # noqa: E731
    preprocessor = ("AutoTokenizer" if has("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")
                    else "AutoProcessor" if has("preprocessor_config.json", "processor_config.json") else None)
    return {"auto_class": auto, "name": Path(result.path).name or "merged", "preprocessor": preprocessor,
            "pipeline": (pipeline or tag) if preprocessor else None}


def render_card(result: "MergeResult", checkpoints: Sequence["Checkpoint"], *,
                evaluation: str | None = None, model_name: str | None = None) -> "ModelCard":
    """Render the model card of a merge (metadata + body). Never contacts the Hub.

    Args:
        result: the merge's `MergeResult`.
        checkpoints: the opened ingredients, in the user's order.
        evaluation: Markdown for an Evaluation section, if any.
        model_name: the card's title.

    Returns:
        A `huggingface_hub.ModelCard`.

    >>> render_card(merge_result, checkpoints).save("merged/README.md")  # doctest: +SKIP
    """
    from huggingface_hub import ModelCard

    data = _card_data(result, checkpoints)
    cfg = result.config
    template = resources.files("ame_hf.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        data,
        template_str=template,
        model_name=model_name or f"AME merge of {len(result.ingredients)} checkpoints",
        ingredients=[{"name": i.display_name, "sha": f"`{i.sha}`" if i.sha else "local directory"}
                     for i in result.ingredients],
        pivot=_pivot_text(result.pivot),
        optimizer_class=optimizer_class(cfg.optimizer).__name__,
        hyperparameters=reported_hyperparameters(cfg.optimizer, cfg.optimizer_args),
        lr_text=(f"relative: {cfg.relative_lr} × RMS(ingredient − pivot), per tensor" if cfg.relative_lr is not None
                 else f"`{cfg.lr}`"),
        config=cfg,
        output_dtype=output_dtype_text(result, checkpoints),
        usage=_usage(result, checkpoints, data.pipeline_tag),
        order_text="; ".join(f"epoch {e + 1}: {o}" for e, o in enumerate(result.order)),
        command=reproduce_command(result),
        run_yaml=run_yaml(result),
        versions=versions(),
        evaluation=evaluation,
    )


def _card_data(result: "MergeResult", checkpoints: Sequence["Checkpoint"]) -> "ModelCardData":
    """The card's metadata: every Hub ingredient (and a Hub pivot or adapters' base) as `base_model`, and the
    library, license and pipeline tag the ingredients agree on (from their own cards, else their architecture).

    Args:
        result: the merge's `MergeResult`.
        checkpoints: the opened ingredients, in the user's order.

    Returns:
        A `huggingface_hub.ModelCardData`.
    """
    from huggingface_hub import ModelCardData

    ingredient_cards = [ingredient_card_data(i.path) for i in result.ingredients]
    base_model = [i.repo_id for i in result.ingredients if i.repo_id]
    for other in (result.pivot, result.base):  # a Hub pivot, and the base model of PEFT adapters
        if getattr(other, "repo_id", None) and other.repo_id not in base_model:
            base_model.append(other.repo_id)
    base_model = list(dict.fromkeys(base_model))  # keep the user's order, drop repeats
    pipeline = _agreed([c.get("pipeline_tag") for c in ingredient_cards]) or _agreed(
        [_pipeline_from_architectures(c.config) for c in checkpoints])
    return ModelCardData(
        base_model=base_model or None,
        # A merge of PEFT adapters is a full transformers model, whatever the adapters' cards say.
        library_name=_agreed([c.get("library_name") for c in ingredient_cards if c.get("library_name") != "peft"])
        or "transformers",
        license=_agreed([c.get("license") for c in ingredient_cards]),
        pipeline_tag=pipeline,
        tags=TAGS,
        base_model_relation="merge" if base_model else None,
    )


def _pivot_text(pivot: Any) -> str:
    """The pivot as the card names it: a checkpoint with its commit, the soup, or an ingredient index."""
    if hasattr(pivot, "display_name"):
        return pivot.display_name + (f" @ `{pivot.sha}`" if pivot.sha else "")
    return "uniform mean of the ingredients (the soup)" if pivot == "mean" else f"ingredient {pivot}"


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
                   f"as the best {metric} ({better} is better) on `{dataset}` ({task}). {held_out}"
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


def selection_card(ingredient: Ingredient, refs: Sequence[str], candidates: int,
                   by: str = "`ame-hf tune`", base: Ingredient | None = None) -> "ModelCard":
    """The card of a `tune` (or greedy soup) output that is the ingredient it selected: an unchanged copy of
    it, or for a PEFT adapter (with its `base`) the full model the adapter makes of that base.

    Args:
        ingredient: the selected ingredient.
        refs: every ingredient, as the card lists them.
        candidates: how many candidates it was selected from.
        by: what selected it, as Markdown.
        base: the base model, when the ingredient is a LoRA adapter.

    Returns:
        A `huggingface_hub.ModelCard`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    repos = [r for r in (ingredient.repo_id, base.repo_id if base else None) if r]
    data = ModelCardData(base_model=repos or None, tags=["ame-hf", "model-selection"], library_name="transformers")
    revision = lambda i: f"`{i.sha}`" if i.sha else "local directory"  # noqa: E731
    what = (f"so this is that LoRA adapter merged into its base **{base.display_name}** ({revision(base)}): the "
            "full model `W_base + scaling * B @ A`, the weights peft's `merge_and_unload()` gives, written by "
            "ame-hf's merge" if base else "so this is an unchanged copy of it")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# Selected ingredient\n\n"
                     f"This model was **selected by {by}** from {candidates} candidates: no merge "
                     f"scored better on the validation data "
                     f"than the ingredient **{ingredient.display_name}** ({revision(ingredient)}), {what}."
                     f"\n\nCandidates merged from: {', '.join(refs)}\n")
