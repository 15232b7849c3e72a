"""The records of the input stage: `Entry`, one reference as the stage knows it, and `Inputs`, the checked inputs
of one run (the report, then the opened checkpoints) that the download, the engine, the finish and the card use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .compatibility import CompatibilityReport
from .config import AmeConfig
from .errors import IncompatibleCheckpointsError, keywords_named
from .labels import RowPermuted
from .modules import ModuleFolder
from .records import HubSource, Ingredient
from .vocabulary import TokenizerFiles

# The keywords a report's line may name (as `base=REF`): those of `AmeConfig`.
FIELDS = tuple(f.name for f in dataclasses.fields(AmeConfig))

@dataclass(kw_only=True, eq=False)
class Entry:
    """One reference of a run as the input stage knows it.

    Attributes:
        source: where it comes from: a local `Ingredient`, or a `HubSource` pinned to its commit.
        light: its local folder (a Hub one's snapshot in the cache: light files first, weights once fetched).
        adapter: the `adapter_config.json` of a PEFT adapter, else None.
        weights: True once its weights are in `light.path` (always for a local folder).
    """

    source: Ingredient | HubSource
    light: Ingredient
    adapter: dict[str, Any] | None = None
    weights: bool = False

    @property
    def ref(self) -> str:
        """The reference as the run was given it."""
        return self.source.ref

    @property
    def remote(self) -> bool:
        """A Hub reference whose weights the stage downloads (offline, the cache holds what it holds)."""
        return isinstance(self.source, HubSource) and self.source.sha is not None



@dataclass(kw_only=True, eq=False)
class Inputs:
    """The checked inputs of one run: what the check read and said, carried on to the download, the engine, the
    finish and the card.

    Attributes:
        stage: the `InputStage` that read them (and caches them).
        entries: the ingredients, in the user's order.
        pivot: another checkpoint to start from, if the pivot is one.
        base: the base model of the PEFT adapters, if any.
        pivot_is_base: the pivot is `base`.
        pivot_index: the ingredient the pivot keyword names (`first`: 0, an index: it; else 0).
        tokenizer_source: the tokenizer-source keyword or index, or the `Entry` of another checkpoint.
        report: the compatibility report (made once; its views are upgraded by `open`).
        checked: the checkpoints the check saw (ingredients, then the pivot's).
        modules: the sentence-transformers module folders with weights, checked (merged beside the model).
        allow_dtype_mismatch: dtype differences are notes (an output dtype was chosen).
        module_notes: the notes the check of the module folders added to the report.
    """

    stage: Any  # the `InputStage` (inputs.py, which imports this module)
    entries: list[Entry]
    pivot: Entry | None
    base: Entry | None
    pivot_is_base: bool
    pivot_index: int
    tokenizer_source: str | int | Entry
    report: CompatibilityReport
    checked: list[Checkpoint] = field(default_factory=list)
    modules: list[ModuleFolder] = field(default_factory=list)
    allow_dtype_mismatch: bool = False
    module_notes: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        """Every input's local folder (a Hub one's is in the cache): what `out_dir` may never touch."""
        every = [*self.entries, *([self.pivot] if self.pivot else []), *([self.base] if self.base else [])]
        source = [self.tokenizer_source] if isinstance(self.tokenizer_source, Entry) else []
        return [e.light.path for e in [*every, *source]]

    @property
    def ingredients(self) -> list[Ingredient]:
        """The ingredients as resolved (their local folders), in the user's order."""
        return [e.light for e in self.entries]

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """The ingredients under the output's tensor names (readable once `open` ran)."""
        return self.report.checkpoints

    @property
    def pivot_checkpoint(self) -> Checkpoint | None:
        """The pivot checkpoint (another checkpoint, or the base), under the output's tensor names; else None."""
        return self.report.pivot

    @property
    def pivot_ingredient(self) -> Ingredient | None:
        """The pivot checkpoint as recorded: another checkpoint, or the base (`base`)."""
        chosen = self.pivot or (self.base if self.pivot_is_base else None)
        return chosen.light if chosen else None

    def raise_for_errors(self) -> None:
        """Refuse inputs the check found incompatible.

        Raises:
            IncompatibleCheckpointsError: the report has errors (with its one-line summary; the `AmeConfig` fields
                its lines name as `base=REF` are its `fields`, which the CLI shows as flags).
        """
        if not self.report.ok:
            summary = self.report.summary()
            raise IncompatibleCheckpointsError(summary, report=self.report, fields=keywords_named(summary, FIELDS))

    def open(self) -> "Inputs":
        """After the check passed: download what is missing (announced, disk checked first), then upgrade the
        report's views to the opened files (compared with the checked headers, not checked again).

        Returns:
            These inputs, whose `checkpoints` can now be read.

        Raises:
            IncompatibleCheckpointsError: as `raise_for_errors`.
            InsufficientSpaceError, HubError, IngredientNotFoundError: the download failed.
            CheckpointError: the downloaded files differ from the checked headers.
        """
        self.raise_for_errors()
        every = [*self.entries, *([self.pivot] if self.pivot else []), *([self.base] if self.base else [])]
        self.stage.fetch(every)
        for checked, report in [(self.checked, self.report), *((m.checked, m.report) for m in self.modules)]:
            pairs = list(zip(checked, [*report.checkpoints, *([report.pivot] if report.pivot is not None else [])]))
            views = [_upgraded(view, c, self.stage.opened(c)) for c, view in pairs]
            report.checkpoints, report.pivot = views[:len(report.checkpoints)], (
                views[-1] if report.pivot is not None else None)
        if self.report.unread_ties:  # a tied alias stored beside its target: its values say how it loads
            self.checked = [self.stage.opened(c) for c in self.checked]
            self.stage.report(self)
            self.raise_for_errors()
        return self

    # -- which model the output's files come from -------------------------------------------------
    def vocabulary_source(self) -> str | int | TokenizerFiles:
        """`tokenizer_source` as the vocabulary plan takes it: `auto`/`union`, an ingredient index, or another
        checkpoint's tokenizer (`pivot` means the pivot: its index, or the pivot checkpoint's tokenizer).

        Returns:
            The keyword, the index, or the `TokenizerFiles`.
        """
        source = self.tokenizer_source
        if isinstance(source, Entry):
            return self.stage.tokenizer(self.stage.tokenizer_dir(source, self.base))
        if source == "pivot":
            chosen = self.pivot or (self.base if self.pivot_is_base else None)
            return self.stage.tokenizer(self.stage.tokenizer_dir(chosen, self.base)) if chosen else self.pivot_index
        if source == "first":
            return 0
        return source

    def tokenizer_dir(self) -> Path:
        """Where the output's tokenizer, chat template and processor files come from: with differing
        vocabularies the plan's source; else `tokenizer_source` (`auto`: the pivot's, else the first's).

        Returns:
            The folder (for an adapter without tokenizer files: its base's).
        """
        vocab = self.report.vocab
        source: str | int | Entry = self.tokenizer_source
        if vocab is not None and vocab.tokenizer is None:
            source = vocab.source
        if isinstance(source, Entry):
            return self.stage.tokenizer_dir(source, self.base)
        if source in ("auto", "union", "pivot"):
            chosen = self.pivot or (self.base if self.pivot_is_base else None)
            if chosen is not None:
                return self.stage.tokenizer_dir(chosen, self.base)
            source = self.pivot_index
        return self.stage.tokenizer_dir(self.entries[0 if source == "first" else int(source)], self.base)


def _upgraded(view: Checkpoint, checked: Checkpoint, opened: Checkpoint) -> Checkpoint:
    """`view` (the check's checkpoint, perhaps under the output's names) over the opened files."""
    if opened is checked:
        return view
    if isinstance(view, RowPermuted):  # rows in the output's label order: the same order over the opened view
        return view.over(_upgraded(view.inner, checked, opened))
    if view is checked:
        return opened
    return opened.renamed({new: view.stored[new] for new in view.tensors})
