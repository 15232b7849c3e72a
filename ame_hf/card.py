"""The model card (README.md) and `ame_config.yaml` of a merge output.

Rendered from `model_cards/ame_model_card.md` with `huggingface_hub.ModelCard`; no network calls.
"""

from __future__ import annotations

import importlib.metadata
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .optimizers import full_hyperparameters, optimizer_class

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from .checkpoint import Checkpoint
    from .records import MergeResult

logger = logging.getLogger(__name__)

TAGS = ["ame-hf", "merge", "model-ensembling"]
TEMPLATE = "ame_model_card.md"
VERSIONED = ("ame-hf", "torch", "transformers", "huggingface_hub", "safetensors", "accelerate")

# Architecture suffix -> pipeline tag, when the ingredients' cards do not say.
_PIPELINES = [
    ("ForCausalLM", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
    ("ForImageClassification", "image-classification"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForAudioClassification", "audio-classification"),
]


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _pipeline_from_architectures(config: dict[str, Any]) -> str | None:
    for arch in config.get("architectures") or []:
        for suffix, tag in _PIPELINES:
            if str(arch).endswith(suffix):
                return tag
    return None


def _agreed(values: Sequence[Any]) -> Any:
    """The common value when every ingredient gives the same non-empty one, else None."""
    values = list(values)
    return values[0] if values and values[0] and all(v == values[0] for v in values) else None


def ingredient_card_data(path: Path) -> dict[str, Any]:
    """The YAML metadata of an ingredient's own README.md, if it has one (read locally)."""
    readme = path / "README.md"
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception as err:  # a broken card of an ingredient must not break the merge
        logger.info("ignoring unreadable card %s: %s", readme, err)
        return {}


def run_dict(result: "MergeResult") -> dict[str, Any]:
    """The content of `ame_config.yaml`: run keys, AmeConfig fields, then what was resolved."""
    cfg = result.config.to_dict()
    pivot = result.pivot
    if hasattr(pivot, "recipe_ref"):
        cfg["pivot"] = pivot.recipe_ref(result.path)
    lr_for_defaults = result.config.lr if result.config.lr is not None else 1e-3
    return {
        "ingredients": [i.recipe_ref(result.path) for i in result.ingredients],
        **cfg,
        "ame_hf_version": versions()["ame-hf"],
        "resolved": {
            "order": result.order,
            "optimizer_class": optimizer_class(result.config.optimizer).__name__,
            "hyperparameters": _hyperparameters(result, lr_for_defaults),
            "ingredients": [
                {"ref": i.ref, "repo_id": i.repo_id, "revision": i.revision, "sha": i.sha}
                for i in result.ingredients
            ],
        },
    }


def _hyperparameters(result: "MergeResult", lr: float) -> dict[str, Any]:
    params = full_hyperparameters(result.config.optimizer, result.config.optimizer_args, lr)
    params.pop("lr", None)  # shown separately: it may be relative and per tensor
    return params


def run_yaml(result: "MergeResult") -> str:
    import yaml

    header = ("# ame-hf merge configuration: `ame-hf merge --config ame_config.yaml --out DIR` reproduces\n"
              "# the same weights. The `resolved` section is informational and ignored when read back.\n")
    return header + yaml.safe_dump(run_dict(result), sort_keys=False)


def write_run_file(path: Path, result: "MergeResult") -> None:
    path.write_text(run_yaml(result), encoding="utf-8")


def render_card(result: "MergeResult", checkpoints: Sequence["Checkpoint"], *, command: str | None = None,
                evaluation: str | None = None, model_name: str | None = None) -> "ModelCard":
    """Render the model card of a merge (metadata + body). Never contacts the Hub."""
    from huggingface_hub import ModelCard, ModelCardData

    ingredient_cards = [ingredient_card_data(i.path) for i in result.ingredients]
    base_model = [i.repo_id for i in result.ingredients if i.repo_id]
    pivot = result.pivot
    if getattr(pivot, "repo_id", None) and pivot.repo_id not in base_model:
        base_model.append(pivot.repo_id)
    base_model = list(dict.fromkeys(base_model))  # keep the user's order, drop repeats
    pipeline = _agreed([c.get("pipeline_tag") for c in ingredient_cards]) or _agreed(
        [_pipeline_from_architectures(c.config) for c in checkpoints])
    data = ModelCardData(
        base_model=base_model or None,
        library_name=_agreed([c.get("library_name") for c in ingredient_cards]) or "transformers",
        license=_agreed([c.get("license") for c in ingredient_cards]),
        pipeline_tag=pipeline,
        tags=TAGS,
        base_model_relation="merge" if base_model else None,
    )
    cfg = result.config
    lr_text = (f"relative: {cfg.relative_lr} × RMS(ingredient − pivot), per tensor" if cfg.relative_lr is not None
               else f"`{cfg.lr}`")
    order_text = "; ".join(f"epoch {e + 1}: {o}" for e, o in enumerate(result.order))
    pivot_text = (f"{pivot.display_name}" + (f" @ `{pivot.sha}`" if pivot.sha else "")
                  if hasattr(pivot, "display_name") else
                  ("uniform mean of the ingredients (the soup)" if pivot == "mean" else f"ingredient {pivot}"))
    ingredients = [{"name": i.display_name, "sha": f"`{i.sha}`" if i.sha else "local directory"}
                   for i in result.ingredients]
    template = resources.files("ame_hf.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        data,
        template_str=template,
        model_name=model_name or f"AME merge of {len(result.ingredients)} checkpoints",
        ingredients=ingredients,
        pivot=pivot_text,
        optimizer_class=optimizer_class(cfg.optimizer).__name__,
        hyperparameters=_hyperparameters(result, cfg.lr or 1e-3),
        lr_text=lr_text,
        config=cfg,
        order_text=order_text,
        command=command,
        run_yaml=run_yaml(result),
        versions=versions(),
        evaluation=evaluation,
    )
