"""Where a config keeps its vocabulary size: in its text config (transformers' `get_text_config()`), the config
itself for a text model, a nested one (`text_config`) for a vision-language model."""

from __future__ import annotations

import copy
import functools
import json
from typing import Any


# Dicts a config holds that are never a sub-config, so never its text config.
_NOT_SUB_CONFIGS = frozenset({"rope_scaling", "rope_parameters", "quantization_config", "id2label", "label2id",
                              "task_specific_params", "auto_map"})


def vocab_size(config: dict[str, Any]) -> Any:
    """The `vocab_size` of the config's text config (None when it states none).

    A config with no other dict in it (a Llama's) has its size at the top level whatever its text config: read
    there without importing transformers, whose model config modules pull in sympy (62 MiB of a merge's peak
    memory and about 1 s of its start)."""
    if all(k in _NOT_SUB_CONFIGS for k, v in config.items() if isinstance(v, dict)):
        return config.get("vocab_size")
    key = _text_key(json.dumps(config, sort_keys=True, default=str))
    inner = config.get(key) if key else None
    return inner.get("vocab_size") if isinstance(inner, dict) else config.get("vocab_size")


def with_vocab_size(config: dict[str, Any], size: int) -> dict[str, Any]:
    """A copy of `config` whose text config has `vocab_size` = `size` (a top-level one too, where it states one)."""
    out = copy.deepcopy(config)
    key = _text_key(json.dumps(config, sort_keys=True, default=str))
    if key and isinstance(out.get(key), dict):
        out[key]["vocab_size"] = size
    if not key or "vocab_size" in out:
        out["vocab_size"] = size
    return out


@functools.lru_cache(maxsize=32)
def _text_key(config_json: str) -> str | None:
    """The key of the sub-config `get_text_config()` returns, or None when that is the config itself (or the config
    cannot be built: then the top level, as before)."""
    from transformers import AutoConfig

    config = json.loads(config_json)
    settings = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "auto_map")}
    try:
        cfg = AutoConfig.for_model(config.get("model_type"), **settings)
    except Exception:  # noqa: BLE001  not a model type transformers has: read the top level
        return None
    text = cfg.get_text_config()
    if text is cfg:
        return None
    return next((k for k in getattr(cfg, "sub_configs", {}) if getattr(cfg, k, None) is text), None)
