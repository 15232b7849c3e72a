"""Per-document scores of an lm-eval run for `guard`: the floats lm-eval logs for each document of every task, each
task's documents weighted so that their weighted mean is the combined score `lm_harness` reports; or why there are none.

A leaf task's metric must be aggregated as the mean of its per-document values (`acc`, `acc_norm`, `exact_match`,
...: `mean` in its `metric_list`, or lm-eval's default for the metric) and those values must average to the score
lm-eval reports for it; a group's score is lm-eval's mean of its leaf tasks' scores, weighted by their sizes
(`weight_by_size`, lm-eval's default) or not. Anything else (`f1`, `bleu`, `mcc`, perplexities: corpus-level
aggregations; missing samples) gives a line naming the task and the metric instead, and the guard keeps the best
score. Only floats are kept: lm-eval's sample dicts (prompts, outputs) are dropped by the caller.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Mapping

# A document's weight: the task's weight over the weights' sum, times its share in its group (1 for a task named
# itself), over the task's documents; scaled so that the weights sum to the number of documents (1 each for one
# task, so its per-document scores are lm-eval's own values).
Weighted = list[tuple[Fraction, list[float]]]


def per_document(out: Mapping[str, Any], tasks: tuple[tuple[str, float], ...], metric: str,
                 index: Mapping[str, Any]) -> tuple[list[float], list[float]] | str:
    """`evaluation.PerExample` for an lm-eval run logged with `log_samples=True`, or why there is none.

    Args:
        out: lm-eval's output (`results`, `configs`, `group_subtasks`, `samples`).
        tasks: `(task or group, weight)` as `LmEvalTasks.tasks`.
        metric: lm-eval's `metric,filter`.
        index: lm-eval's task index (`TaskManager.task_index`), for a group's `aggregate_metric_list`.

    Returns:
        `(numerators, denominators)` in the tasks' order, then their leaf tasks', then lm-eval's document order; or a
        line (`lm-eval task X: ...`) saying why the guard cannot apply.
    """
    total = sum(Fraction(w) for _, w in tasks)
    parts: Weighted = []
    for name, weight in tasks:
        shares = _shares(out, name, metric, index)
        if isinstance(shares, str):
            return shares
        for leaf, share in shares:
            values = _values(out, leaf, metric)
            if isinstance(values, str):
                return values
            parts.append((Fraction(weight) / total * share / len(values), values))
    documents = sum(len(v) for _, v in parts)
    num: list[float] = []
    den: list[float] = []
    for weight, values in parts:
        c = float(weight * documents)
        num.extend(c * v for v in values)
        den.extend([c] * len(values))
    return num, den


def _shares(out: Mapping[str, Any], name: str, metric: str,
            index: Mapping[str, Any]) -> list[tuple[str, Fraction]] | str:
    """The leaf tasks whose documents make `name`'s score, each with its share of it."""
    subtasks = out.get("group_subtasks") or {}
    if name in (out.get("configs") or {}) and not subtasks.get(name):
        return [(name, Fraction(1))]
    leaves = _leaves(subtasks, name)
    if not leaves:
        return f"lm-eval task {name}: lm-eval reported no tasks of it"
    aggregates = ((getattr(index.get(name), "cfg", None) or {}).get("aggregate_metric_list")) or []
    if isinstance(aggregates, dict):
        aggregates = [aggregates]
    filt = metric.partition(",")[2]
    entry = next((a for a in aggregates if isinstance(a, dict) and a.get("metric") == metric.partition(",")[0]
                  and (a.get("filter_list") is None or filt in _listed(a["filter_list"]))), None)
    if entry is None:
        return f"lm-eval group {name}: its aggregation of {metric} is not in lm-eval's task index"
    by_size = entry.get("weight_by_size", True)
    if not isinstance(by_size, bool):
        return f"lm-eval group {name}: weight_by_size={by_size!r} is not true or false"
    results = out.get("results") or {}
    missing = [leaf for leaf in leaves if metric not in results.get(leaf, {})]
    if missing:
        return f"lm-eval group {name}: its task {missing[0]} reports no {metric}"
    sizes = [Fraction(int(results[leaf].get("sample_len", 0))) if by_size else Fraction(1) for leaf in leaves]
    if sum(sizes) <= 0:
        return f"lm-eval group {name}: its tasks scored no documents"
    return [(leaf, size / sum(sizes)) for leaf, size in zip(leaves, sizes)]


def _listed(filters: Any) -> list[str]:
    return [filters] if isinstance(filters, str) else list(filters)


def _leaves(subtasks: Mapping[str, Any], name: str, seen: frozenset[str] = frozenset()) -> list[str]:
    """A group's leaf tasks, nested groups expanded, in lm-eval's order (as its `Group.get_all_tasks`)."""
    out: list[str] = []
    for child in subtasks.get(name) or []:
        if subtasks.get(child) and child not in seen:
            out.extend(_leaves(subtasks, child, seen | {name}))
        elif child not in out:
            out.append(child)
    return out


def _values(out: Mapping[str, Any], task: str, metric: str) -> list[float] | str:
    """The task's per-document values of `metric` (its filter's samples, by document), checked to be the documents
    whose mean is the task's reported score."""
    name, _, filt = metric.partition(",")
    how = _aggregation(out.get("configs", {}).get(task) or {}, name)
    if how != "mean":
        return (f"lm-eval task {task} aggregates {metric} by {how}, not as the mean of its documents' values"
                if how else f"lm-eval task {task} aggregates {metric} by a function lm-eval does not name (not known "
                "to be the mean of its documents' values)")
    rows = sorted((s for s in (out.get("samples") or {}).get(task) or [] if s.get("filter") == filt),
                  key=lambda s: s.get("doc_id", -1))
    ids = [s.get("doc_id") for s in rows]
    if not rows or len(set(ids)) != len(ids):
        return f"lm-eval task {task}: lm-eval logged no per-document {metric}"
    values = [s.get(name) for s in rows]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return f"lm-eval task {task}: its per-document {metric} are not all finite numbers"
    values = [float(v) for v in values]
    reported = (out.get("results") or {}).get(task, {}).get(metric)
    if not isinstance(reported, (int, float)) or not math.isclose(math.fsum(values) / len(values), reported,
                                                                   rel_tol=1e-9, abs_tol=1e-12):
        return f"lm-eval task {task}: its per-document {metric} do not average to its reported score"
    return values


def _aggregation(config: Mapping[str, Any], metric: str) -> str | None:
    """The name of the aggregation lm-eval applies to `metric` in a task of this config (None: not known)."""
    import importlib

    importlib.import_module("lm_eval.api.metrics")  # registers lm-eval's aggregations (on first import)
    from lm_eval.api.registry import AGGREGATION_REGISTRY, get_metric_aggregation

    named = {id(fn): key for key, fn in AGGREGATION_REGISTRY.items()}
    listed = config.get("metric_list")
    if listed is None:
        how: Any = get_metric_aggregation(metric)
    else:
        entry = next((m for m in listed if isinstance(m, dict) and m.get("metric") == metric), None)
        if entry is None:
            return None
        how = entry["aggregation"] if "aggregation" in entry else get_metric_aggregation(metric)
    if isinstance(how, str):
        return how if how in AGGREGATION_REGISTRY else None
    return named.get(id(how)) if how is not None else None
