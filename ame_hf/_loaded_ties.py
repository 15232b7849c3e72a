"""Tied aliases stored with values of their own: transformers 5 ties an alias (`lm_head.weight`) to its target only
when the checkpoint lacks it or holds the same values (`tie_weights` on load), so such a checkpoint loads untied, and
the merge must see it so. Found by comparing the stored values (a Hub checkpoint's once its weights are downloaded)."""

from __future__ import annotations

from typing import Any

import torch

from ._differences import updated
from .checkpoint import Checkpoint
from .reconcile import TIE_FLAG, Layout, model_layout, rename
from .report import CompatibilityReport

# Elements compared at a time (of each tensor, in float64): the memory a comparison takes stays bounded.
_CHUNK = 1 << 22


def loose_aliases(ckpt: Checkpoint, layout: Layout) -> frozenset[str] | None:
    """The tied aliases (`layout` names) `ckpt` stores beside their target with other values: what transformers
    loads untied. An adapter's are its base's (transformers ties or unties the base before peft merges).

    Args:
        ckpt: a checkpoint under its stored names.
        layout: the layout of its own config.

    Returns:
        Those aliases; None when it stores an alias beside its target but its values cannot be read yet (a Hub
        checkpoint known from its headers).
    """
    reader = getattr(ckpt, "base", None) or ckpt
    renaming = rename(reader.tensors, layout)
    if not renaming.aliases:
        return frozenset()
    if reader.header_only:
        return None
    return frozenset(alias for alias, stored in renaming.aliases.items()
                     if not _equal(reader, stored, renaming.names[layout.tied[alias]]))


def _equal(ckpt: Checkpoint, a: str, b: str) -> bool:
    """`torch.equal` of two stored tensors, as transformers compares the loaded ones, a slice of rows at a time."""
    shape = tuple(ckpt.tensors[a].shape)
    if shape != tuple(ckpt.tensors[b].shape):
        return False
    if not shape:
        return torch.equal(ckpt.read(a, dtype=torch.float64), ckpt.read(b, dtype=torch.float64))
    step = max(1, _CHUNK // max(1, ckpt.tensors[a].numel // max(1, shape[0])))
    for start in range(0, shape[0], step):
        rows = (start, min(shape[0], start + step))
        if not torch.equal(ckpt.read(a, rows, torch.float64), ckpt.read(b, rows, torch.float64)):
            return False
    return True


def untied_layout(layout: Layout, config: dict[str, Any], aliases: frozenset[str]) -> Layout | None:
    """The layout of `config` with each `tie_word_embeddings` it sets true set false, when that stores exactly
    `aliases` besides what `layout` stores, and ties the rest as it does; else None.

    Args:
        layout: the layout of `config`.
        config: the checkpoint's config (with the architectures of `layout`).
        aliases: the aliases it loads untied.
    """
    flags = {key: False for key, value in layout.tie_flags if value is True}
    try:
        flipped = model_layout(updated(config, flags))
    except Exception:  # noqa: BLE001  the class cannot be built with them: no setting is known to untie
        return None
    tied = {a: t for a, t in layout.tied.items() if a not in aliases}
    return flipped if flipped.tied == tied and flipped.keys == layout.keys | aliases else None


def untie_loaded(checkpoints: list[Checkpoint], kinds: list[tuple], layouts: dict[tuple, Layout],
                 loose: list[frozenset[str] | None], report: CompatibilityReport) -> dict[str, str] | None:
    """Each checkpoint that stores tied aliases with values of their own (`loose`) seen with its config's layout
    untied: its kind (in `kinds`) gets them, and `layouts` that kind's layout; a note says so.

    Returns:
        alias -> target, of every alias some checkpoint loads untied; None when a config cannot untie exactly its
        aliases (an error in `report`).
    """
    untied: dict[str, str] = {}
    for i, (ckpt, kind) in enumerate(zip(checkpoints, list(kinds))):
        found = loose[i]
        if not found:
            continue
        targets = {a: layouts[kind].tied[a] for a in found}
        untied.update(targets)
        kinds[i] = (*kind, found)
        layouts[kinds[i]] = untied_layout(layouts[kind], {**ckpt.config, "architectures": list(kind[0])}, found)
        if layouts[kinds[i]] is None:
            report.errors.append(f"{ckpt.name} stores {', '.join(sorted(found))} with values other than what its "
                                 f"config ties them to ({TIE_FLAG}), which transformers loads untied, and no "
                                 f"{TIE_FLAG} setting of {kind[0][0]} unties exactly those; save it with the matching "
                                 "config, or without them")
            return None
        report.notes.append(f"{ckpt.name} stores {', '.join(sorted(found))} with values other than "
                            f"{', '.join(sorted(set(targets.values())))} although its config ties them ({TIE_FLAG}): "
                            "transformers loads it untied, and so does the merge")
    return untied
