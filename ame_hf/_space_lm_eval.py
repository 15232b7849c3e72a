"""The Space's lm-evaluation-harness boxes (Evaluate and Tune) as the library's `lm_eval_*` keywords, with the public
Space's rule: lm-eval's own tasks only, since a task folder's YAMLs can run code and read the server's disk."""

from __future__ import annotations

from typing import Any, Mapping

from .errors import InvalidConfigError

# The boxes, by the keyword each one is (the endpoints' parameters, in this order).
LM_EVAL_KEYS = ("lm_eval_tasks", "lm_eval_include", "lm_eval_metric", "lm_eval_limit", "lm_eval_num_fewshot")


def _number(value: Any, key: str, minimum: int) -> int | None:
    """A box's whole number; blank (and, for the limit, 0: an empty number box sends it) is None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer() or number < minimum:
        raise InvalidConfigError(f"{key} must be a whole number >= {minimum}, got {value!r}", field=key)
    return int(number)


def lm_eval_keywords(form: Mapping[str, Any] | None, *, allow_local_paths: bool = True) -> dict[str, Any]:
    """The form's lm-eval boxes as `ame_hf.evaluate` / `ame_hf.tune` keywords; blank boxes are left out.

    Args:
        form: the boxes by keyword (`LM_EVAL_KEYS`): task names (`NAME[=W],...`), a task folder on this machine,
            the metric (`acc,none`), the documents per task (0: all), the few-shot examples (blank: each task's).
        allow_local_paths: accept a task folder (False on a public Space).

    Returns:
        The keywords (empty without tasks and other boxes).

    Raises:
        InvalidConfigError: a number that is not whole, or a task folder where local paths are disabled.

    >>> lm_eval_keywords({"lm_eval_tasks": " arc_easy ", "lm_eval_limit": 0.0, "lm_eval_num_fewshot": "0"})
    {'lm_eval_tasks': 'arc_easy', 'lm_eval_num_fewshot': 0}
    """
    form = form or {}
    values = {key: form.get(key).strip() if isinstance(form.get(key), str) else form.get(key) for key in LM_EVAL_KEYS}
    values["lm_eval_limit"] = _number(values["lm_eval_limit"], "lm_eval_limit", 0) or None
    values["lm_eval_num_fewshot"] = _number(values["lm_eval_num_fewshot"], "lm_eval_num_fewshot", 0)
    out = {key: value for key, value in values.items() if value is not None and value != ""}
    if "lm_eval_include" in out and not allow_local_paths:
        raise InvalidConfigError("lm_eval_include: task folders are disabled in this app (their YAMLs can run code "
                                 "and read the server's disk); use lm-eval's own task names, or run the Space or "
                                 "the CLI on your machine", field="lm_eval_include")
    return out
