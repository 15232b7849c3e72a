"""`CompatibilityReport`: what `check` found (errors refuse a merge, notes do not), and how it is printed:
what decides first, the rest counted. `compatibility.check_compatibility` makes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .vocabulary import VocabularyPlan

SHOWN = 8  # errors (and notes) `format` shows before counting the rest


@dataclass
class CompatibilityReport:
    """The outcome of `check_compatibility`: `errors` block a merge, `notes` do not."""

    names: list[str]
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # What the merge then uses: every ingredient (and the pivot) seen under the output's tensor names,
    # and which ingredient's config and layout the output takes.
    checkpoints: list[Checkpoint] = field(default_factory=list, repr=False, compare=False)
    pivot: Checkpoint | None = field(default=None, repr=False, compare=False)
    source: int = 0
    config_keys: list[str] = field(default_factory=list)  # config keys that differ (said with the errors)
    # When vocabularies differ: how token-indexed rows are matched, and which tensors are token-indexed.
    vocab: VocabularyPlan | None = field(default=None, repr=False, compare=False)
    vocab_keys: frozenset[str] = frozenset()
    # The ingredient the pivot keyword names (`first`: 0, an index: it), for `config_source`.
    pivot_index: int = 0
    # Config fields whose difference another finding already explains (no second note), and what the output's
    # config.json changes from its source's (dotted keys: an untied head, the labels of the merged rows).
    config_said: set[str] = field(default_factory=set)
    config_updates: dict[str, Any] = field(default_factory=dict)
    # Checkpoints known from their headers that store a tied alias beside its target: whether transformers loads
    # them untied is known once their values are downloaded (`Inputs.open` checks again then).
    unread_ties: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def mergeable(self) -> bool:
        """No error, and at least the 2 ingredients a merge needs (`ame-hf check` exits 0 only then)."""
        return self.ok and len(self.names) >= 2

    def summary(self, *, hint: bool = True) -> str:
        """One line: the verdict and the first problem (`hint`: say how to see the rest, for `merge`'s error)."""
        if self.ok and not self.mergeable:
            return f"a merge needs at least 2 ingredients; {', '.join(self.names) or 'none given'} on its own reads fine"
        if self.ok:
            return f"compatible: {len(self.names)} checkpoints can be merged" + (
                f" ({len(self.notes)} note(s))" if self.notes else "")
        more = (f" (and {len(self.errors) - 1} more difference(s)" + ("; run `ame-hf check` for all)" if hint else ")")
                if len(self.errors) > 1 else "")
        keys = f"; their configs differ in {', '.join(self.config_keys[:6])}" if self.config_keys else ""
        return f"incompatible checkpoints: {self.errors[0]}{more}{keys}"

    def format(self, *, verbose: bool = False) -> str:
        """The report, one finding a line, what decides first. Without `verbose`: at most `SHOWN` errors and notes
        (the rest counted), and no notes on how a merge would go when it cannot go."""
        lines = [("OK  " if self.mergeable else "FAIL ") + self.summary(hint=False)]
        lines += _shown("error: ", self.errors, verbose)
        if self.ok or verbose:
            lines += _shown("note:  ", self.notes, verbose)
        elif self.notes:
            lines.append(f"  ({len(self.notes)} note(s) on how the merge would go: --verbose shows them)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checkpoints": self.names, "errors": self.errors, "notes": self.notes}

    def config_source(self) -> Checkpoint:
        """The checkpoint whose config (and side files) the output takes: the pivot when it is a model of the
        ingredients' architecture, else the pivot's ingredient, else the one whose layout the check chose."""
        chosen = self.checkpoints[self.source]
        arch = chosen.config.get("architectures")
        if self.pivot is not None and self.pivot.config.get("architectures") == arch:
            return self.pivot
        if self.checkpoints[self.pivot_index].config.get("architectures") == arch:
            return self.checkpoints[self.pivot_index]
        return chosen


def _shown(label: str, found: list[str], verbose: bool) -> list[str]:
    shown = found if verbose else found[:SHOWN]
    more = [f"  ... and {len(found) - len(shown)} more (--verbose shows all)"] if len(found) > len(shown) else []
    return [f"  {label}{line}" for line in shown] + more
