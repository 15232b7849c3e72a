"""Models as folders of full weights, for what must load them (`evaluate`, `tune`, the greedy soup): a checkpoint
is its own folder; a PEFT adapter, checked against its base up front, is written as the full model it makes of
that base (`merging.materialize`, the soup of one) into a scratch folder when first needed, and removed after."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .adapters import is_adapter_dir
from .errors import IncompatibleCheckpointsError
from .evaluation import read_model_config, sort_key
from .fetch import resolve_refs
from .inputs import check_inputs
from .merging import materialize
from .records import Ingredient
from .vocabulary import is_tokenizer_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ResolvedModel:
    """One model reference, resolved and ready to be scored.

    Attributes:
        ingredient: the resolved reference (a checkpoint with its weights, or an adapter's own files).
        config: its `config.json` (an adapter's: its base's).
        tokenizer: the folder with its tokenizer files (an adapter without any: its base's).
        base: an adapter's base model (its config and tokenizer files); None for a full checkpoint.
    """

    ingredient: Ingredient
    config: dict[str, Any]
    tokenizer: Path
    base: Ingredient | None = None

    @property
    def is_adapter(self) -> bool:
        return self.base is not None

    @property
    def name(self) -> str:
        return self.ingredient.display_name


def resolve_models(refs: Sequence[str | os.PathLike], *, base: str | os.PathLike | None = None,
                   token: str | None = None) -> list[ResolvedModel]:
    """Every reference resolved (`fetch.resolve_refs`); each PEFT adapter checked as a merge checks it, with
    its base (`base`, else its own `base_model_name_or_path`), before anything is evaluated.

    Raises:
        IngredientNotFoundError, HubError, CheckpointError: as `resolve_refs`; IncompatibleCheckpointsError:
            an adapter whose base is not named or does not fit it (the merge's one line).
    """
    out = []
    for ingredient in resolve_refs(refs, token=token):
        if not is_adapter_dir(ingredient.path):
            out.append(ResolvedModel(ingredient=ingredient, tokenizer=ingredient.path,
                                     config=read_model_config(ingredient.path, ingredient.display_name)))
            continue
        checked = check_inputs([ingredient.pinned_ref], base_ref=os.fspath(base) if base else None, token=token)
        if not checked.report.ok:
            raise IncompatibleCheckpointsError(checked.report.summary(), report=checked.report)
        assert checked.base is not None  # an adapter that passed the check has one
        own = any(is_tokenizer_file(p.name) for p in ingredient.path.iterdir())
        out.append(ResolvedModel(ingredient=ingredient, base=checked.base.light,
                                 tokenizer=ingredient.path if own else checked.base.light.path,
                                 config=read_model_config(checked.base.light.path, ingredient.display_name)))
    return out


def input_paths(models: Sequence[ResolvedModel]) -> list[Path]:
    """Every model's local directory and its base's (a Hub one's is in the cache): what `--out` may never touch."""
    return [p for m in models for p in (m.ingredient.path, *([m.base.path] if m.base else []))]


class FullModels:
    """Each model's folder of full weights: its own, or for an adapter its merge into its base, written under
    `scratch` on first use and kept until released. Use it as a context manager: on exit (an error too) what
    it wrote is removed, and a scratch folder it made itself (under TMPDIR) with it.

    Args:
        models: from `resolve_models`.
        scratch: where adapters are written (default: a temporary folder made on first need).
        token, device: of the merges that write adapters.
    """

    def __init__(self, models: Sequence[ResolvedModel], scratch: Path | None = None, *, token: str | None = None,
                 device: str | None = None) -> None:
        self.models, self.scratch = list(models), scratch
        self.token, self.device = token, device
        self._own_scratch = scratch is None
        self._written: dict[int, Path] = {}

    def __enter__(self) -> "FullModels":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def path(self, i: int) -> Path:
        """Model `i`'s folder of full weights (an adapter's is written now unless it is already)."""
        model = self.models[i]
        if not model.is_adapter:
            return model.ingredient.path
        if i not in self._written:
            if self.scratch is None:
                self.scratch = Path(tempfile.mkdtemp(prefix="ame-hf-adapters-"))
            self.scratch.mkdir(parents=True, exist_ok=True)
            logger.info("writing %s merged into its base %s, to evaluate it", model.name, model.base.display_name)
            folder = self.scratch / f"model{i}"
            # The base the check resolved (pinned for a Hub one): the model scored is the one checked.
            materialize(model.ingredient.pinned_ref, folder, base=model.base.pinned_ref, token=self.token,
                        device=self.device)
            self._written[i] = folder
        return self._written[i]

    def hand_over(self, i: int) -> Path | None:
        """For an adapter, its full model's folder, which the caller now owns (to move into an output); None
        for a full checkpoint (its own folder is the user's, to copy)."""
        if not self.models[i].is_adapter:
            return None
        path = self.path(i)
        del self._written[i]
        return path

    def release(self, i: int) -> None:
        """Remove model `i`'s written folder, if any (it is written again if asked for)."""
        folder = self._written.pop(i, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def score_each(self, score: Callable[[Path], float], metric: str | None = None) -> list[float]:
        """Every model's score, each evaluated once. With `metric`, the best one's adapter folder stays
        written (the one a selection may still need: the best single model, the first among equals)."""
        scores: list[float] = []
        for i in range(len(self.models)):
            scores.append(score(self.path(i)))
            keep = min(range(len(scores)), key=lambda k: (-sort_key(scores[k], metric), k)) if metric else None
            for k in [k for k in self._written if k != keep]:
                self.release(k)
        return scores

    def close(self) -> None:
        """Remove every folder written (and the scratch folder, when this made it)."""
        for i in list(self._written):
            self.release(i)
        if self._own_scratch and self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
