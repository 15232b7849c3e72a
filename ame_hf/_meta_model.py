"""The model class a config names, built on the meta device (no weights): what ame-hf asks transformers about a
layout, a conversion or peft's wrappers, never from per-architecture tables."""

from __future__ import annotations

from typing import Any


class UnknownArchitecture(Exception):
    """The config names a model type or class transformers does not have (remote code)."""


def on_meta(config: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(class, config object, model) of the config's first architecture, the model built on the meta device."""
    import torch
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise UnknownArchitecture(f"model_type {model_type!r} is not part of transformers")
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise UnknownArchitecture(f"architecture {names[0] if names else None!r} is not part of transformers")
    settings = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "auto_map")}
    cfg = AutoConfig.for_model(model_type, **settings)
    with torch.device("meta"):
        return cls, cfg, cls(cfg)
