"""The `metric,filter` keys an lm-eval task, group or tag reports, read from lm-eval's task index (its YAMLs with
their includes resolved) as its task factory reads them: no task built, no data set loaded, no model."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def reported_metrics(index: Mapping[str, Any], name: str) -> set[str] | None:
    """What lm-eval's results will hold under `name`: its `metric,filter` keys.

    A task: its `metric_list` (lm-eval's defaults for its `output_type` without one), under each of its filters.
    A group: its `aggregate_metric_list` (with the filters its tasks report when it names none); nothing without
    one. A tag: nothing (its tasks report, the tag does not).

    Args:
        index: `TaskManager.task_index`.
        name: the task, group or tag.

    Returns:
        The keys, or None where only running the task tells (a Python task, `process_results`, a metric given as a
        function, a name the index lacks).
    """
    entry = index.get(name)
    return None if entry is None else _metrics(index, entry, {}, frozenset())


def _metrics(index: Mapping[str, Any], entry: Any, overrides: dict[str, Any], seen: frozenset[str]) -> set[str] | None:
    kind = getattr(getattr(entry, "kind", None), "name", None)
    cfg = {**(entry.cfg or {}), **overrides}
    if kind == "TAG":
        return set()
    if kind == "GROUP":
        if entry.name in seen:
            return None
        return _group(index, entry.name, cfg, overrides, seen | {entry.name})
    return _task(cfg) if kind == "TASK" else None


def _task(cfg: dict[str, Any]) -> set[str] | None:
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    if "class" in cfg or cfg.get("process_results") is not None:
        return None
    listed = cfg.get("metric_list")
    if listed is None:
        names = DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type", "generate_until"))
    elif isinstance(listed, list) and all(isinstance(m, dict) and isinstance(m.get("metric"), str) for m in listed):
        names = [m["metric"] for m in listed]
    else:
        return None
    if names is None or any("/" in n or "\\" in n for n in names):  # `!function` metrics: named by the function
        return None
    filters = [f.get("name") for f in cfg.get("filter_list") or [] if isinstance(f, dict)] or ["none"]
    return {f"{m},{f}" for m in names for f in filters}


def _group(index: Mapping[str, Any], name: str, cfg: dict[str, Any], overrides: dict[str, Any],
           seen: frozenset[str]) -> set[str] | None:
    from lm_eval.config.group import GroupConfig

    group_keys = {f.name for f in dataclasses.fields(GroupConfig)}
    aggregates = cfg.get("aggregate_metric_list")
    if not aggregates:
        return set()
    if isinstance(aggregates, dict):
        aggregates = [aggregates]
    children: set[str] | None = None
    out: set[str] = set()
    for agg in aggregates:
        metric = agg.get("metric") if isinstance(agg, dict) else None
        if not isinstance(metric, str):
            return None
        filters = agg.get("filter_list")
        if filters is None:  # lm-eval takes the filters its tasks report for that metric
            if children is None:
                children = _members(index, name, cfg, overrides, group_keys, seen)
                if children is None:
                    return None
            out |= {k for k in children if k.split(",", 1)[0] == metric}
        else:
            out |= {f"{metric},{f}" for f in ([filters] if isinstance(filters, str) else filters)}
    return out


def _members(index: Mapping[str, Any], name: str, cfg: dict[str, Any], overrides: dict[str, Any],
             group_keys: set[str], seen: frozenset[str]) -> set[str] | None:
    """The keys the group's members report (as lm-eval's factory builds them: the group's own task keys, then each
    member's, override the member's YAML)."""
    shared = {**{k: v for k, v in cfg.items() if k not in group_keys}, **overrides}
    out: set[str] = set()
    for item in cfg.get("task") or []:
        if isinstance(item, str):
            ref, extra = item, shared
        elif isinstance(item, dict) and isinstance(item.get("task"), str):
            ref, extra = item["task"], {**shared, **item}
        else:
            return None  # an inline group: left to the run
        entry = index.get(ref)
        if entry is None:
            got = _task({**extra, "task": f"{name}::{ref}"})  # an inline task
        elif getattr(entry.kind, "name", None) == "TAG":
            tagged = [_metrics(index, index[t], extra, seen) if t in index else None for t in sorted(entry.tags)]
            got = None if any(t is None for t in tagged) else set().union(*tagged)
        else:
            got = _metrics(index, entry, extra, seen)
        if got is None:
            return None
        out |= got
    return out


def leaf_tasks(index: Mapping[str, Any], name: str, _seen: frozenset[str] = frozenset()) -> set[str] | None:
    """The tasks lm-eval runs for `name` (a task itself; a group's members, nested groups and tags expanded; a
    tag's tasks), as its task manager names them when it refuses one run twice; None where the index cannot tell."""
    entry = index.get(name)
    kind = getattr(getattr(entry, "kind", None), "name", None)
    if kind in ("TASK", "PY_TASK"):
        return {name}
    if kind == "TAG":
        return set(entry.tags)
    if kind != "GROUP" or name in _seen:
        return None
    return _group_leaves(index, name, (entry.cfg or {}).get("task") or [], _seen | {name})


def _group_leaves(index: Mapping[str, Any], group: str, members: list[Any], seen: frozenset[str]) -> set[str] | None:
    out: set[str] = set()
    for item in members:
        ref = item if isinstance(item, str) else item.get("task") if isinstance(item, dict) else None
        if isinstance(item, dict) and isinstance(item.get("group"), str):
            ref = item["group"]
            got = leaf_tasks(index, ref, seen) if ref in index else _group_leaves(
                index, f"{group}::{ref}", item.get("task") or [], seen)
        elif isinstance(ref, str):
            got = leaf_tasks(index, ref, seen) if ref in index else {f"{group}::{ref}"}
        else:
            got = None
        if got is None:
            return None
        out |= got
    return out
