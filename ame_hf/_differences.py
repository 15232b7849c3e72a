"""How `check` says that models differ in a field: once per field, listing who has which value (never once per
pair of models), and, where the output takes one model's file, whose value it keeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

MISSING = object()  # a field (or file) a model does not have
_SHOWN = 80  # characters of a value shown in a note


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config's fields by dotted name; nested sub-configs (`text_config`, `vision_config`) key by key."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key.endswith("_config"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def updated(config: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` with `updates` (dotted keys, as `flatten` gives them) set: a sub-config it lacks is
    left alone."""
    out = json.loads(json.dumps(config))
    for key, value in updates.items():
        *parents, leaf = key.split(".")
        target = out
        for part in parents:
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict):
            target[leaf] = value
    return out


def shown(value: Any) -> str:
    """A value as a note shows it: its repr, a long one cut (with the length of a list)."""
    if value is MISSING:
        return "none"
    text = repr(value)
    if len(text) <= _SHOWN:
        return text
    size = f" ({len(value)} items)" if isinstance(value, (list, tuple, dict)) else ""
    return text[:_SHOWN - 20] + "..." + size


def who_has(names: Sequence[str], values: Sequence[Any], show: Callable[[Any], str] = shown) -> str:
    """`a has 0.7; b, c have 1.0; d has none`: the models grouped by value (as `show` writes it), in order of
    first appearance."""
    groups: dict[str, list[str]] = {}
    for name, value in zip(names, values):
        groups.setdefault(show(value), []).append(name)
    return "; ".join(f"{', '.join(who)} {'has' if len(who) == 1 else 'have'} {text}" for text, who in groups.items())


def differing_fields(names: Sequence[str], configs: Sequence[dict[str, Any]], *,
                     skip: Sequence[str] = ()) -> list[tuple[str, str]]:
    """`(field, who has what)` for every flattened field on which the configs do not all agree (a field whose last
    part is in `skip` is left out), sorted by field."""
    flat = [flatten(c) for c in configs]
    out = []
    for key in sorted(set().union(*flat)):
        values = [f.get(key, MISSING) for f in flat]
        if key.rsplit(".", 1)[-1] in skip or all(_same(v, values[0]) for v in values):
            continue
        out.append((key, who_has(names, values)))
    return out


def file_notes(file: str, names: Sequence[str], folders: Sequence[Path | None], *, taken: str | None,
               skip: Sequence[str] = ()) -> list[str]:
    """Notes on a JSON file that models hold (or not) in their folders: whether they have it, then each field
    that differs among those that do, once, naming whose file the output takes (`taken`)."""
    contents = [read_json(folder / file) if folder is not None else MISSING for folder in folders]
    keep = f"; the output takes {taken}'s" if taken is not None else ""
    if all(c is MISSING for c in contents):
        return []
    notes = []
    if any(c is MISSING for c in contents):
        notes.append(f"{file}: {who_has(names, contents, lambda c: 'none' if c is MISSING else 'one')}{keep}")
    have = [(n, c if isinstance(c, dict) else {"(contents)": c}) for n, c in zip(names, contents) if c is not MISSING]
    notes += [f"{file} {key}: {who}{keep}" for key, who in differing_fields([n for n, _ in have], [c for _, c in have],
                                                                        skip=skip)]
    return notes


def read_json(file: Path, missing: Any = MISSING) -> Any:
    """A JSON file's contents; `missing` when it is absent or unreadable."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return missing


def _same(a: Any, b: Any) -> bool:
    return a is b or (a is not MISSING and b is not MISSING and a == b)
