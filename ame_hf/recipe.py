"""The recipe of a merge: what determines its weights. Its short digest stamps every shard; its YAML
form (`ame_config.yaml`) is written into every output and read back by `merge --config`."""

from __future__ import annotations

import functools
import logging
import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import (INFO_KEYS, PIVOT_WORDS, SOURCE_WORDS, AmeConfig, load_yaml_mapping, normalize_pivot,
                     normalize_source)
from .errors import InvalidConfigError
from .optimizers import optimizer_class, reported_hyperparameters
from .records import Ingredient, MergeResult
from .resolve import rebase_ref
from .weights import weighted_entries

VERSIONED = ("ame-hf", "torch", "transformers", "huggingface_hub", "safetensors", "accelerate")


# Options added after the first stamps, at their defaults (left out of the stamp).
LATER_DEFAULTS = {"weights": None, "transform": "none", "density": 1.0, "gamma": 0.01, "rescale": None,
                  "disjoint_sum": False}


def recipe_digest(config: AmeConfig, ingredients: Sequence[Ingredient], pivot: Any) -> str:
    """A short hash of everything that determines the weights (stamped into every shard).

    Args:
        config: the merge's config.
        ingredients: the resolved ingredients (their identity: pinned commit, or local path).
        pivot: the pivot: a keyword, an index, or a resolved checkpoint.

    Returns:
        16 hex digits.
    """
    values = config.to_dict()
    for key, default in (("order", "given"), ("save_as", "model"), ("adapter_rank", None), ("adapter_energy", None),
                         *LATER_DEFAULTS.items()):
        if values.get(key, default) == default:
            values.pop(key, None)  # the default of a later option: stamps of earlier merges stay the same
    payload = json.dumps({"config": values, "ingredients": [i.identity for i in ingredients],
                          "pivot": pivot.identity if isinstance(pivot, Ingredient) else pivot},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    """The installed version of each package that shapes the output (the card and `ame_config.yaml`).

    Returns:
        `{package: version, or "not installed"}`, in `VERSIONED` order.
    """
    return dict(_versions())


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    # importlib.metadata scans every installed distribution per lookup: 40 ms a call here, 3 calls a merge.
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return tuple(out.items())


def run_dict(result: MergeResult) -> dict[str, Any]:
    """The content of `ame_config.yaml`: run keys, AmeConfig fields, then what was resolved.

    Local paths are recorded relative to the output (`result.home`), Hub references pinned to their commit.

    Args:
        result: the merge's record.

    Returns:
        The mapping, in the file's order.
    """
    cfg = result.config.to_dict()
    pivot = result.pivot
    if hasattr(pivot, "recipe_ref"):
        cfg["pivot"] = pivot.recipe_ref(result.home)
    if result.base is not None and cfg.get("base"):  # like the ingredients: pinned, or relative to the output
        cfg["base"] = result.base.recipe_ref(result.home)
    return {
        "ingredients": [i.recipe_ref(result.home) for i in result.ingredients],
        **cfg,
        "ame_hf_version": versions()["ame-hf"],
        "resolved": {
            "order": result.order,
            "optimizer_class": optimizer_class(result.config.optimizer).__name__,
            "hyperparameters": reported_hyperparameters(result.config.optimizer, result.config.optimizer_args),
            "ingredients": [
                {"ref": i.ref, "repo_id": i.repo_id, "revision": i.revision, "sha": i.sha}
                for i in result.ingredients
            ],
            **({"base": {"ref": result.base.ref, "repo_id": result.base.repo_id, "revision": result.base.revision,
                         "sha": result.base.sha}} if result.base else {}),
        },
    }


def run_yaml(result: MergeResult) -> str:
    """The text of `ame_config.yaml`: a comment saying how to reproduce, then `run_dict` as YAML.

    Args:
        result: the merge's record.

    Returns:
        The file's text.
    """
    header = ("# ame-hf merge configuration: `ame-hf merge --config ame_config.yaml --out DIR` reproduces\n"
              "# the same weights. The `resolved` section is informational and ignored when read back.\n")
    return header + yaml.safe_dump(run_dict(result), sort_keys=False)


def write_run_file(path: Path, result: MergeResult) -> None:
    """Write `run_yaml(result)` to `path` (the output's `ame_config.yaml`).

    Args:
        path: the file to write.
        result: the merge's record.
    """
    path.write_text(run_yaml(result), encoding="utf-8")


def write_selection_file(path: Path, ingredient: Ingredient, candidates: int, base: Ingredient | None = None) -> None:
    """The `ame_config.yaml` of a `tune` output that is one ingredient (a PEFT adapter: merged into its
    `base`): it marks the folder as ame-hf's own, and `read_recipe` refuses it with a line saying there is
    no merge to reproduce.

    Args:
        path: the file to write.
        ingredient: the selected ingredient.
        candidates: how many candidates it was selected from.
        base: the base model, when the ingredient is a LoRA adapter.
    """
    what = "that adapter merged into its base" if base else "an unchanged copy of it"
    path.write_text(
        f"# ame-hf tune selected a single ingredient: this output is {what}, not a merge.\n"
        + yaml.safe_dump({"selected_by": "tune", "selected_ingredient": ingredient.pinned_ref,
                          **({"selected_base": base.pinned_ref} if base else {}),
                          "candidates": candidates}, sort_keys=False), encoding="utf-8")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """What a `--config` YAML file asks for: ingredient references, the output, and `AmeConfig` values.

    Attributes:
        refs: the ingredients (local paths made relative to the YAML's folder).
        out: the output folder, if the file names one.
        values: `AmeConfig` fields as written (paths rebased the same way).
    """

    refs: list[str]
    out: str | None
    values: dict[str, Any]


def read_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe (e.g. a merge's `ame_config.yaml`). Relative local paths in it are relative to
    the file's own directory, so `--config merged/ame_config.yaml` works from anywhere; pivot and
    tokenizer-source keywords (and indices) stay keywords, even beside a folder of that name.

    Args:
        path: the YAML file.

    Returns:
        A `Recipe`: references, output and `AmeConfig` values (`resolved` and the version left out).

    Raises:
        InvalidConfigError: unreadable YAML, a malformed `ingredients` list, or a `tune` copy of an ingredient.
            A mergekit config (`merge_method:`) is read as its AME form (`mergekit_config.translate`).
    """
    path = Path(path)
    data = load_yaml_mapping(path)
    folder = path.parent
    from .mergekit_config import is_mergekit, translate

    if is_mergekit(data):  # mergekit's paths are relative to the working directory, as mergekit reads them
        refs, values, summary = translate(data)
        logging.getLogger(__name__).info("mergekit config %s: %s", path, summary)
        return Recipe(refs=refs, out=None, values=values)
    if data.get("selected_by") == "tune":
        adapter = f" (a PEFT adapter, merged into its base {data['selected_base']})" if data.get("selected_base") else ""
        raise InvalidConfigError(
            f"{path} belongs to a `tune` output that is a copy of the ingredient "
            f"{data.get('selected_ingredient')}{adapter}, not a merge: there is no merge to reproduce; use that ingredient")
    for key in INFO_KEYS:
        data.pop(key, None)
    refs, weights = weighted_entries(data.pop("ingredients", None) or [], str(path))
    if weights is not None:
        if data.get("weights") is not None:
            raise InvalidConfigError(f"{path}: give the weights once, as weights: or as weight: in ingredients")
        data["weights"] = weights
    if not (isinstance(refs, list) and all(isinstance(r, str) for r in refs)):
        raise InvalidConfigError(f"{path}: ingredients must be a list of references")
    # A keyword or an index is never a path, even when a folder of that name sits beside the YAML: the
    # config's own readers decide what is one.
    for key, normalize, words in (("pivot", normalize_pivot, PIVOT_WORDS),
                                  ("tokenizer_source", normalize_source, SOURCE_WORDS)):
        if isinstance(data.get(key), str):
            data[key] = normalize(data[key])
            if isinstance(data[key], str) and data[key] not in words:
                data[key] = rebase_ref(data[key], folder)
    if isinstance(data.get("base"), str):
        data["base"] = rebase_ref(data["base"], folder)
    out = data.pop("out", None)
    return Recipe(refs=[rebase_ref(r, folder) for r in refs],
                  out=rebase_ref(out, folder) if isinstance(out, str) else out, values=data)
