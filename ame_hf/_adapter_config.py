"""What a PEFT adapter's `adapter_config.json` says, and whether ame-hf can merge it exactly: each key checked
against the fields of peft's own `LoraConfig` (read at run time), from the config alone, before any weight."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
# What ame-hf computes itself: a low-rank additive update. Every other PEFT method is refused by name.
SUPPORTED = ("LORA",)
MERGE_FIRST = "merge_and_unload it with peft first and merge that full model"

# What each field of peft's `LoraConfig` (read from peft at run time) does to what `merge_and_unload` gives.
# Bookkeeping, training-only settings, and what the stored factors already say (which modules, which layers):
_NO_EFFECT = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "lora_dropout", "layers_to_transform",
    "layers_pattern", "megatron_core", "runtime_config", "qalora_group_size", "ensure_weight_tying",
    # settings of an initialization, used only with their `init_lora_weights` (checked by value below)
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
})
# Computed here as peft computes it (`bias` and `init_lora_weights` checked by value below):
_COMPUTED = frozenset({"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
                       "modules_to_save", "lora_bias", "bias", "init_lora_weights", "trainable_token_indices",
                       "target_parameters"})  # fused MoE experts and other parameters: _param_lora.py
# Set, these make a model that is not `W_base + scaling * B @ A` over the base's tensors:
_REFUSED = {
    "use_dora": "is a DoRA adapter (use_dora): its merge rescales every column by a trained magnitude",
    "use_qalora": "is a QA-LoRA adapter (use_qalora): its factors act on pooled inputs",
    "layer_replication": "replicates layers (layer_replication): its model has other layers than the base",
    "megatron_config": "adapts Megatron parallel layers (megatron_config), not a transformers model",
}
# `init_lora_weights` values whose saved factors are the trained ones over the untouched base:
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# ... and those that change the base when peft builds the adapter: saved unconverted, their factors are relative
# to that changed base (peft's `path_initial_model_for_weight_conversion` turns them into a plain LoRA).
_BASE_CHANGING_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA"}


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def read_adapter_config(path: Path, name: str) -> dict[str, Any]:
    """The adapter's `adapter_config.json` as data (`adapter_refusals` says whether ame-hf can merge it).

    Raises:
        CheckpointError: not a JSON object.
    """
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{name}: {ADAPTER_CONFIG} is not valid JSON ({err})", path=path) from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{name}: {ADAPTER_CONFIG} is not a JSON object", path=path)
    return config


def adapter_refusals(name: str, config: dict[str, Any]) -> list[str]:
    """Why ame-hf cannot merge this adapter exactly, one line per reason (none: it can), from its config alone.

    Every key is checked against the fields of peft's own `LoraConfig`: a key peft does not know is refused, and
    so is any set option whose effect on `merge_and_unload` ame-hf does not compute (another PEFT method, a LoRA
    variant, an initialization that changes the base, an option of a newer peft).

    >>> adapter_refusals("org/lora", {"peft_type": "LORA", "r": 8, "use_dora": True})  # doctest: +SKIP
    ['org/lora is a DoRA adapter (use_dora): ...']
    """
    kind = str(config.get("peft_type") or "").upper()
    if kind not in SUPPORTED:
        return [f"{name} is a PEFT {kind or 'unknown-type'} adapter; ame-hf merges LoRA adapters (a low-rank additive "
                f"update): {MERGE_FIRST}"]
    try:
        import peft
    except ImportError:
        return [f"{name} is a PEFT adapter: checking its {ADAPTER_CONFIG} needs peft (pip install peft)"]
    fields = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    out = []
    for key, value in config.items():
        field = fields.get(key)
        if field is None:
            out.append(f"{name}: unknown {ADAPTER_CONFIG} key {key!r} (peft {peft.__version__} does not know it "
                       "either), so what it does to the merged weights is unknown; merge the adapter with the peft "
                       "that saved it (merge_and_unload) first, or remove the key if it is not peft's")
        elif key == "init_lora_weights":
            out += _init_refusal(name, value)
        elif key == "bias" and value not in ("none", "all", "lora_only"):
            out.append(f"{name}: {ADAPTER_CONFIG} has bias={value!r}, which peft {peft.__version__} does not "
                       f"define; {MERGE_FIRST}")
        elif key in _NO_EFFECT or key in _COMPUTED or _unset(value, field):
            continue
        elif key == "alora_invocation_tokens":
            out.append(f"{name} is an aLoRA adapter (alora_invocation_tokens): it acts only from its invocation "
                       "tokens on, so no merged model equals it (peft refuses to merge it too); use it unmerged")
        elif key in _REFUSED:
            out.append(f"{name} {_REFUSED[key]}; ame-hf merges plain LoRA adapters: {MERGE_FIRST}")
        else:  # a LoRA variant, or an option of a newer peft: its merge is not known here
            what = "a LoRA variant" if field.metadata.get("is_lora_variant") else "an option"
            out.append(f"{name}: {ADAPTER_CONFIG} sets {key}={value!r}, {what} of peft {peft.__version__} whose "
                       f"merge ame-hf does not compute; {MERGE_FIRST}")
    return out


def _unset(value: Any, field: dataclasses.Field) -> bool:
    """The field's default, or an empty value (null, false, [], {}) that peft treats as not set."""
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    return value == default or not value


def _init_refusal(name: str, value: Any) -> list[str]:
    if isinstance(value, bool) or (isinstance(value, str) and value in _PLAIN_INITS):
        return []
    text = str(value).lower()
    method = next((label for prefix, label in _BASE_CHANGING_INITS.items() if text.startswith(prefix)), None)
    if method is not None:
        return [f"{name} was saved unconverted after {method} initialization (init_lora_weights={value!r}): its "
                f"factors apply to the base as {method} changed it, not to the base; save it converted with peft, "
                "save_pretrained(out, path_initial_model_for_weight_conversion=<its initial adapter>), which makes it "
                f"a plain LoRA adapter, or {MERGE_FIRST}"]
    if text == "loftq":
        return [f"{name} was initialized with LoftQ (init_lora_weights='loftq'): its factors apply to the "
                f"LoftQ-quantized base, not to the base; {MERGE_FIRST}"]
    return [f"{name}: {ADAPTER_CONFIG} has init_lora_weights={value!r}, an initialization ame-hf does not know; "
            f"{MERGE_FIRST}"]


def adapter_base(config: dict[str, Any]) -> str | None:
    """The base model reference an adapter names: `base_model_name_or_path[@revision]`."""
    base = config.get("base_model_name_or_path")
    if not base:
        return None
    return f"{base}@{config['revision']}" if config.get("revision") else str(base)


def module_pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override (`rank_pattern`, `alpha_pattern`), matched by peft's own `get_pattern_key`."""
    from peft.utils.other import get_pattern_key

    return patterns.get(get_pattern_key(list(patterns), module), default)
