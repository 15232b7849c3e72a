"""Models as folders of full weights, for what must load them (`evaluate`, `tune`, the greedy soup): a checkpoint
is its own folder; a PEFT adapter, checked against its base up front, is written as the full model it makes of
that base (`merging.materialize`, the soup of one) into a scratch folder when first needed, and removed after."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .evaluation import sort_key
from .inputs import Entry, InputStage
from .merging import materialize
from .output import clean_up_temp_dirs, process_temp_dir, remove_temp_dir
from .records import Ingredient

logger = logging.getLogger(__name__)

# The scratch folders adapters are written into (`output.process_temp_dir`).
SCRATCH_PREFIX = "ame-hf-adapters-"


@dataclass(frozen=True, kw_only=True)
class ResolvedModel:
    """One model reference, resolved by the input stage and ready to be scored once its weights are fetched.

    Attributes:
        ingredient: the resolved reference (its folder: light files first, then its weights; an adapter's own files).
        config: its `config.json` (an adapter's: its base's).
        tokenizer: the folder with its tokenizer files (an adapter without any: its base's).
        base: an adapter's base model; None for a full checkpoint.
        entry: the input stage's record of it (and `base_entry` of its base).
        stage: the `InputStage` that resolved it (its merges and downloads share it).
    """

    ingredient: Ingredient
    config: dict[str, Any]
    tokenizer: Path
    base: Ingredient | None = None
    entry: Entry = field(repr=False, compare=False)
    base_entry: Entry | None = field(default=None, repr=False, compare=False)
    stage: InputStage = field(repr=False, compare=False)

    @property
    def is_adapter(self) -> bool:
        """A PEFT adapter (scored as its merge into its base)."""
        return self.base is not None

    @property
    def name(self) -> str:
        """How messages name it (the repo ID, or the reference as given)."""
        return self.ingredient.display_name


def resolve_models(refs: Sequence[str | os.PathLike], *, base: str | os.PathLike | None = None,
                   token: str | None = None, stage: InputStage | None = None) -> list[ResolvedModel]:
    """Every reference resolved by the input stage, without any model's weights: configs and tokenizers read
    from the light files, each PEFT adapter checked as a merge checks it against its base (`base`, else its own
    `base_model_name_or_path`). `fetch_models` downloads the weights once the caller's own checks passed.

    Args:
        refs: local folders and/or Hub repo IDs.
        base: the base model of the adapters among them.
        token: Hub token (when no `stage` is given).
        stage: the run's `InputStage` (default: a new one).

    Returns:
        One `ResolvedModel` per reference, in order.

    Raises:
        IngredientNotFoundError, HubError, CheckpointError: a reference that cannot be resolved or read;
        IncompatibleCheckpointsError: an adapter whose base is not named or does not fit it (the merge's one line).
    """
    stage = stage or InputStage(token=token)
    out = []
    for entry in stage.entries(refs):
        if entry.adapter is None:
            out.append(ResolvedModel(ingredient=entry.light, tokenizer=entry.light.path, config=stage.config(entry),
                                     entry=entry, stage=stage))
            continue
        checked = stage.check([entry.ref], base=os.fspath(base) if base else None)
        checked.raise_for_errors()
        assert checked.base is not None  # an adapter that passed the check has one
        out.append(ResolvedModel(ingredient=entry.light, base=checked.base.light, entry=entry, stage=stage,
                                 base_entry=checked.base, tokenizer=stage.tokenizer_dir(entry, checked.base),
                                 config=stage.config(checked.base)))
    return out


def fetch_models(models: Sequence[ResolvedModel]) -> None:
    """Download the weights of every Hub model (an adapter's base too): announced, the disk checked first.

    Args:
        models: from `resolve_models`.

    Raises:
        InsufficientSpaceError: the cache's disk cannot hold them (nothing is downloaded).
        HubError, IngredientNotFoundError: a download failed.
    """
    for stage in {id(m.stage): m.stage for m in models}.values():
        stage.fetch([e for m in models if m.stage is stage for e in (m.entry, m.base_entry) if e is not None])


def input_paths(models: Sequence[ResolvedModel]) -> list[Path]:
    """Every model's local directory and its base's (a Hub one's is in the cache): what `out_dir` may never touch.

    Args:
        models: from `resolve_models`.

    Returns:
        The folders.
    """
    return [p for m in models for p in (m.ingredient.path, *([m.base.path] if m.base else []))]


class FullModels:
    """Each model's folder of full weights: its own, or for an adapter its merge into its base, written under
    `scratch` on first use and kept until released. Use it as a context manager: on exit (an error too) what
    it wrote is removed, and a scratch folder it made itself with it (`<tmp>/ame-hf-adapters-<pid>-*`: removed
    at the latest when the process exits, by Ctrl-C or SIGTERM too; one a killed process left goes the next time).

    Args:
        models: from `resolve_models`.
        scratch: where adapters are written (default: a temporary folder made on first need).
        token, device: of the merges that write adapters.

    >>> with FullModels(resolve_models(["./lora"], base="org/base")) as full:  # doctest: +SKIP
    ...     full.score_each(lambda folder: evaluate_model(str(folder), data, task, metric))
    [0.84]
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
        """Model `i`'s folder of full weights (an adapter's is written now unless it is already).

        Args:
            i: the model's index in `models`.

        Returns:
            The folder.

        Raises:
            AmeError: as `merging.materialize` (writing an adapter's full model).
        """
        model = self.models[i]
        if not model.is_adapter:
            return model.ingredient.path
        if i not in self._written:
            if self.scratch is None:
                clean_up_temp_dirs(SCRATCH_PREFIX)
                self.scratch = process_temp_dir(SCRATCH_PREFIX)
            self.scratch.mkdir(parents=True, exist_ok=True)
            logger.info("writing %s merged into its base %s, to evaluate it", model.name, model.base.display_name)
            folder = self.scratch / f"model{i}"
            # The base the check resolved (pinned for a Hub one): the model scored is the one checked.
            materialize(model.entry.ref, folder, base=model.base_entry.ref, token=self.token, device=self.device,
                        stage=model.stage)
            self._written[i] = folder
        return self._written[i]

    def hand_over(self, i: int) -> Path | None:
        """For an adapter, its full model's folder, which the caller now owns (to move into an output); None
        for a full checkpoint (its own folder is the user's, to copy).

        Args:
            i: the model's index in `models`.

        Returns:
            The folder, or None.

        Raises:
            AmeError: as `path`.
        """
        if not self.models[i].is_adapter:
            return None
        path = self.path(i)
        del self._written[i]
        return path

    def release(self, i: int) -> None:
        """Remove model `i`'s written folder, if any (it is written again if asked for).

        Args:
            i: the model's index in `models`.
        """
        folder = self._written.pop(i, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def score_each(self, score: Callable[[Path], float], metric: str | None = None, *,
                   memo: Callable[[str, Callable[[], float]], float] | None = None) -> list[float]:
        """Every model's score, each evaluated once. With `metric`, the best one's adapter folder stays
        written (the one a selection may still need: the best single model, the first among equals).

        Args:
            score: scores one folder of full weights.
            metric: the metric, whose direction says which score is best; None: no folder is kept.
            memo: `memo(key, compute)` gives model i's score under `val ingredient {i}` (a resumed `tune`'s
                journal: recorded, so nothing is written or scored, or computed now).

        Returns:
            The scores, in the order of `models`.

        Raises:
            AmeError: as `path`; and whatever `score` raises.
        """
        scores: list[float] = []
        for i in range(len(self.models)):
            compute = lambda i=i: score(self.path(i))  # noqa: E731
            scores.append(memo(f"val ingredient {i}", compute) if memo else compute())
            keep = min(range(len(scores)), key=lambda k: (-sort_key(scores[k], metric), k)) if metric else None
            for k in [k for k in self._written if k != keep]:
                self.release(k)
        return scores

    def close(self) -> None:
        """Remove every folder written (and the scratch folder, when this made it)."""
        for i in list(self._written):
            self.release(i)
        if self._own_scratch and self.scratch is not None:
            remove_temp_dir(self.scratch)
            self.scratch = None
