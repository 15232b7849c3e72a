"""Every model card ame-hf writes: a merge's (from `model_cards/ame_model_card.md`) and the card of a `tune` output
that is a copy of one ingredient (`card_results` adds evaluation and selection sections).

Rendered with `huggingface_hub.ModelCard`; no network calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ._model_files import project_url
from .config import QUANTIZED_OUTPUT_DTYPES, AmeConfig
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
        elif isinstance(value, list):  # order, weights, per-ingredient density: 2,0,1
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
    if result.config.dtype in QUANTIZED_OUTPUT_DTYPES:
        from .requantize import card_text  # torch: only for a quantized output

        return card_text(result.config.dtype, checkpoints)
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


def _ingredient_rows(result: "MergeResult", checkpoints: Sequence["Checkpoint"]) -> list[dict[str, str]]:
    """The card's ingredient table: each ingredient's name, commit, and what it is (a full checkpoint, or a LoRA
    adapter of which base), with the tokens it added when the vocabularies were matched by token."""
    vocab = result.report.vocab if result.report is not None else None
    sha = lambda i: f"`{i.sha}`" if i.sha else "local directory"  # noqa: E731
    rows = []
    for k, (ingredient, ckpt) in enumerate(zip(result.ingredients, checkpoints)):
        adapter = getattr(ckpt, "adapter_config", None)  # an adapters.AdapterCheckpoint (not imported: torch)
        kind = "full checkpoint"
        if adapter is not None:
            base = result.base.display_name if result.base is not None else getattr(ckpt.base, "name", "its base")
            kind = f"LoRA adapter (rank {adapter.get('r', '?')}) of {base}, merged as `W_base + delta`"
        if vocab is not None and vocab.tokenizer is None and k != vocab.source:
            added = sum(1 for r in range(vocab.size) if vocab.rows[k][r] >= 0 > vocab.rows[vocab.source][r])
            kind += f"; adds {added} token{'s' if added != 1 else ''}" if added else ""
        rows.append({"name": ingredient.display_name, "sha": sha(ingredient), "kind": kind})
    return rows


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
        ingredients=_ingredient_rows(result, checkpoints),
        project_url=project_url(),
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
