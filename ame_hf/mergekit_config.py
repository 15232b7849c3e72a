"""mergekit YAML configs in (`ame-hf merge --config mergekit.yml --out DIR`): each supported method as the AME
configuration that computes the same weights (README "From mergekit"). Imports no torch.

mergekit 0.1.5's generalized task arithmetic is `base + lambda * mix(w_i * sparsify(x_i - base))`, with `mix` the
sum (divided by the weights' sum when `normalize`) or, with sign election, the sum over the entries that agree
(divided by their weights' sum when `normalize`). In AME terms that is one SGD step from the base over all the
ingredients (batch = all, constant schedule) on the transformed task vectors (`transform`), with the weights as
ingredient weights and `lr = lambda` (`lambda * sum of weights` without `normalize`). `linear` is the weighted soup.
"""

from __future__ import annotations

import difflib
from typing import Any

from .errors import InvalidConfigError

# mergekit method -> ame-hf transform (None: linear, the weighted soup).
METHODS = {"linear": None, "task_arithmetic": "none", "ties": "ties", "dare_ties": "dare_ties",
           "dare_linear": "dare", "breadcrumbs": "breadcrumbs", "breadcrumbs_ties": "breadcrumbs_ties"}
# mergekit 0.1.5's defaults: normalize, rescale.
DEFAULTS = {"task_arithmetic": (False, False), "ties": (True, False), "dare_ties": (False, True),
            "dare_linear": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False)}
# Refused methods -> the closest ame-hf command.
CLOSEST = {
    "slerp": "the weighted soup: ame-hf merge A B --optimizer sgd --weights 1-t,t",
    "nuslerp": "the weighted soup: ame-hf merge A B --optimizer sgd --weights 1-t,t",
    "multislerp": "the weighted soup: ame-hf merge A B C --optimizer sgd --weights W1,W2,W3",
    "karcher": "the soup: ame-hf merge A B C --optimizer sgd",
    "model_stock": "task arithmetic from the base: ame-hf merge A B --pivot BASE --optimizer sgd --lr 1 "
                   "--schedule constant --batch-size 2",
    "della": "TIES with DARE's random drop: ame-hf merge A B --pivot BASE --transform dare_ties --density D "
             "--optimizer sgd --schedule constant --batch-size 2",
    "della_linear": "DARE: ame-hf merge A B --pivot BASE --transform dare --density D --optimizer sgd "
                    "--schedule constant --batch-size 2",
    "sce": "TIES: ame-hf merge A B --pivot BASE --transform ties --density D --optimizer sgd --schedule constant "
           "--batch-size 2",
    "passthrough": "none: ame-hf merges weights of one architecture and does not stack layers; merge whole models "
                   "with ame-hf merge A B",
}
KNOWN_KEYS = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
              "tokenizer", "chat_template", "slices", "modules", "name"}


def is_mergekit(data: Any) -> bool:
    """A mergekit config (its `merge_method`, or a mergekit-moe file's `experts`), not an ame-hf one."""
    return isinstance(data, dict) and ("merge_method" in data or ("experts" in data and "gate_mode" in data))


def _ref(value: Any, what: str) -> str:
    if isinstance(value, dict):  # mergekit's long form: {model: {path: ..., revision: ...}} or {path: ...}
        value = value.get("model", value)
        if isinstance(value, dict):
            path, rev = value.get("path"), value.get("revision")
            value = f"{path}@{rev}" if path and rev else path
    if not isinstance(value, str) or not value.strip():
        raise InvalidConfigError(f"mergekit config: {what} must be a model reference, got {value!r}")
    if "+" in value:
        raise InvalidConfigError(f"mergekit config: {what} {value!r} applies a LoRA with '+'; list the adapter itself "
                                 "as an ingredient (ame-hf merges adapters into their base) instead")
    return value.strip()


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfigError(f"mergekit config: {what} must be one number, got {value!r} (per-layer gradients and "
                                 "filters are not supported: ame-hf applies one value to every tensor)")
    return float(value)


def translate(data: dict[str, Any]) -> tuple[list[str], dict[str, Any], str]:
    """A mergekit config as (ingredient references, `AmeConfig` values, a one-line summary of the AME form).

    Raises:
        InvalidConfigError: an unsupported method (with the closest ame-hf command), key or parameter; one line.
    """
    if "experts" in data and "merge_method" not in data:
        raise InvalidConfigError("mergekit config: a mergekit-moe config (experts, gate_mode) builds a mixture of "
                                 "experts, which ame-hf does not; closest: the dense soup of the experts, ame-hf merge "
                                 "A B C --optimizer sgd")
    method = str(data.get("merge_method", "")).strip().lower()
    if method not in METHODS:
        hint = CLOSEST.get(method)
        if hint is None:
            close = difflib.get_close_matches(method, list(METHODS), n=1)
            hint = f"did you mean {close[0]}?" if close else "supported: " + ", ".join(METHODS)
        raise InvalidConfigError(f"mergekit config: merge_method {method!r} has no AME form in ame-hf; closest: {hint}")
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        raise InvalidConfigError(f"mergekit config: unknown key(s) {', '.join(unknown)}")
    if data.get("slices") or data.get("modules"):
        raise InvalidConfigError("mergekit config: slices and modules (per-layer recipes) are not supported; list "
                                 "whole models under models:")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise InvalidConfigError("mergekit config: models: must list the models to merge")
    shared = dict(data.get("parameters") or {})
    base = _ref(data["base_model"], "base_model") if data.get("base_model") is not None else None
    refs, weights, density, gamma = [], [], [], []
    for k, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry:
            raise InvalidConfigError(f"mergekit config: models[{k}] needs a model: reference")
        ref = _ref(entry["model"], f"models[{k}].model")
        params = {**shared, **(entry.get("parameters") or {})}
        if METHODS[method] is not None and ref == base:
            continue  # mergekit leaves the base out of the task vectors
        if "weight" not in params:
            raise InvalidConfigError(f"mergekit config: models[{k}] ({ref}) has no weight parameter; mergekit "
                                     "requires one")
        refs.append(ref)
        weights.append(_number(params["weight"], f"models[{k}] weight"))
        density.append(_number(params.get("density", 1.0), f"models[{k}] density"))
        gamma.append(_number(params.get("gamma", 0.01), f"models[{k}] gamma"))
    values = _output_values(data, base)
    total = sum(weights)
    if METHODS[method] is None:
        normalize = bool(shared.get("normalize", True))
        if not normalize and abs(total - 1) > 1e-12:
            raise InvalidConfigError(f"mergekit config: linear with normalize: false and weights summing to {total:g} "
                                     "scales the model; ame-hf merges weighted means: set normalize: true")
        if min(weights) > 0:
            values.update(optimizer="sgd", lr=1.0, schedule="harmonic", weights=weights)
            return refs, values, f"linear -> the weighted soup (sgd, lr 1, harmonic) with weights {weights}"
        values.update(optimizer="sgd", lr=1.0, schedule="constant", batch_size=len(refs), pivot="first",
                      weights=weights)
        return refs, values, f"linear -> one sgd step, lr 1, onto the weighted mean (weights {weights})"
    if base is None:
        raise InvalidConfigError(f"mergekit config: {method} needs base_model: (its task vectors are model - base)")
    normalize_default, rescale_default = DEFAULTS[method]
    normalize = bool(shared.get("normalize", normalize_default))
    lam = _number(shared.get("lambda", 1.0), "lambda")
    transform = METHODS[method]
    lr = lam * (1.0 if normalize and abs(total) >= 1e-8 else total)
    values.update(optimizer="sgd", lr=lr, schedule="constant", batch_size=len(refs), epochs=1, pivot=base,
                  weights=weights, transform=transform)
    if transform != "none":
        values.update(density=density[0] if len(set(density)) == 1 else density,
                      rescale="l1" if shared.get("rescale", rescale_default) else "none")
        if transform.startswith("breadcrumbs"):
            values["gamma"] = gamma[0] if len(set(gamma)) == 1 else gamma
        if transform.endswith("ties") and not normalize:
            values["disjoint_sum"] = True
    summary = (f"{method} -> one sgd step from the base (lr {lr:g}, batch of all {len(refs)}, constant) on "
               f"{'the task vectors' if transform == 'none' else transform + '-transformed task vectors'} with "
               f"weights {weights}")
    return refs, values, summary


def _output_values(data: dict[str, Any], base: str | None) -> dict[str, Any]:
    """dtype, tokenizer and chat template as ame-hf options."""
    values: dict[str, Any] = {}
    out = data.get("out_dtype") or data.get("dtype")
    names = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
             "float16": "float16", "fp16": "float16"}
    if out is not None:
        if str(out).lower() not in names:
            raise InvalidConfigError(f"mergekit config: dtype {out!r} is not supported; use float32, bfloat16 or "
                                     "float16")
        values["dtype"] = names[str(out).lower()]
    tokenizer = data.get("tokenizer")
    source = data.get("tokenizer_source")
    if isinstance(tokenizer, dict):
        if tokenizer.get("tokens") or tokenizer.get("pad_to_multiple_of"):
            raise InvalidConfigError("mergekit config: tokenizer.tokens and pad_to_multiple_of are not supported; "
                                     "give tokenizer_source only")
        source = tokenizer.get("source", source)
    if source is not None:
        source = str(source) if not isinstance(source, dict) else _ref(source, "tokenizer_source")
        if source == "base":
            if base is None:
                raise InvalidConfigError("mergekit config: tokenizer_source: base needs base_model:")
            source = base
        values["tokenizer_source"] = source
    template = data.get("chat_template")
    if template not in (None, "auto"):
        raise InvalidConfigError("mergekit config: chat_template other than auto is not supported; ame-hf keeps the "
                                 "tokenizer source's chat template (choose it with tokenizer_source)")
    return values
