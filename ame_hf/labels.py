"""Classifier heads whose rows are labels: the label-indexed tensors found from the model class, and their rows
matched by label name across the ingredients (as vocabulary rows are matched by token), read in the output's order."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ._differences import who_has
from .checkpoint import Checkpoint
from .reconcile import label_tensors

LABEL_KEYS = ("id2label", "label2id")


class RowPermuted(Checkpoint):
    """A checkpoint view whose label-indexed tensors read their rows in another order: row `r` of tensor `name` is
    row `order[name][r]` of `inner`'s (every other read is `inner`'s own).

    Args:
        inner: the view to read from (a plain checkpoint, a renamed view, an adapter).
        order: tensor name -> the inner row of each output row.
    """

    def __init__(self, inner: Checkpoint, order: dict[str, list[int]]) -> None:  # noqa: D107 (not Checkpoint's)
        self.__dict__.update(inner.__dict__)
        self.inner, self.order = inner, order

    def over(self, inner: Checkpoint) -> "RowPermuted":
        """The same rows over another view of the same tensors (the checked view, once opened from its files)."""
        return RowPermuted(inner, self.order)

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        order = self.order.get(name)
        if order is None:
            return self.inner.read(name, rows, dtype)
        wanted = order if rows is None else order[rows[0]:rows[1]]
        return self.inner.read(name, dtype=dtype)[torch.tensor(wanted)]  # a head is small: read whole, then pick

    def __repr__(self) -> str:
        return f"RowPermuted({self.inner!r}, {sorted(self.order)})"


def labels_of(config: dict[str, Any]) -> list[str] | None:
    """The label names in id order (`id2label`; without one, transformers' `LABEL_i` of `num_labels`, default 2),
    or None when `id2label` is unreadable."""
    id2label = config.get("id2label")
    if id2label is None:
        return [f"LABEL_{i}" for i in range(int(config.get("num_labels") or 2))]
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return None


def match_labels(report: Any) -> None:
    """When the ingredients' `id2label` differ: match the rows of the label-indexed tensors by label name (the
    report's views re-read in the output's label order, its config updated to say that order), or refuse a
    different label set by name. The pivot's rows are matched too; a pivot of other labels does not lend them.

    Args:
        report: a `CompatibilityReport` whose views (`checkpoints`, `pivot`) are under the output's names.
    """
    views: list[Checkpoint] = report.checkpoints
    labels = [labels_of(v.config) for v in views]
    if all(lab == labels[0] for lab in labels):
        return
    source = report.config_source()
    try:
        rows, other = label_tensors(source.config)
    except Exception:  # noqa: BLE001  no class: nothing says which tensors are label-indexed
        return
    rows = frozenset(k for k in rows if all(k in v.tensors for v in views))
    if not rows and not other:
        return  # the labels index no tensor: the config note says it
    names = [v.name for v in views]
    report.config_said.update(LABEL_KEYS)
    if len({frozenset(lab or ()) for lab in labels}) > 1 or any(lab is None or len(set(lab)) < len(lab) for lab in labels):
        report.errors.append(f"the classifiers' labels (config.json id2label) differ: {who_has(names, labels)}; their "
                             "head rows cannot be merged across label sets: merge classifiers of the same labels (if "
                             "they are the same classes under other names, give them the same names in config.json)")
        return
    if other:
        report.errors.append(f"tensor(s) {', '.join(sorted(other))} are indexed by label in more than their rows, and "
                             f"the label orders differ ({who_has(names, labels)}): give the classifiers one id2label order")
        return
    order = labels_of(source.config) if set(labels_of(source.config) or ()) == set(labels[0]) else labels[0]
    report.checkpoints = [_in_order(v, lab, order, rows) for v, lab in zip(views, labels)]
    report.pivot = _pivot_in_order(report, order, rows)
    report.config_updates.update({"id2label": {str(i): label for i, label in enumerate(order)},
                                  "label2id": {label: i for i, label in enumerate(order)}})
    report.notes.append(f"labels matched by name (config.json id2label): {who_has(names, labels)}; the rows of "
                        f"{', '.join(sorted(rows))} are merged label by label in the order {order}, which the "
                        "output's id2label says")


def _in_order(view: Checkpoint, labels: Sequence[str], order: Sequence[str], rows: frozenset[str]) -> Checkpoint:
    if list(labels) == list(order):
        return view
    position = {label: i for i, label in enumerate(labels)}
    return RowPermuted(view, {name: [position[label] for label in order] for name in rows})


def _pivot_in_order(report: Any, order: Sequence[str], rows: frozenset[str]) -> Checkpoint | None:
    """The pivot checkpoint's rows in the output's order; of other labels, without its label rows (they then start
    from the mean of the ingredients, as for any tensor a pivot lacks)."""
    pivot: Checkpoint | None = report.pivot
    if pivot is None or not rows & set(pivot.tensors):
        return pivot
    labels = labels_of(pivot.config)
    if labels is not None and sorted(labels) == sorted(order) and len(set(labels)) == len(labels):
        return _in_order(pivot, labels, order, rows)
    report.notes.append(f"pivot {pivot.name} has other labels ({labels}): its rows of {', '.join(sorted(rows))} are "
                        "not used")
    return pivot.renamed({n: pivot.stored[n] for n in pivot.tensors if n not in rows})
