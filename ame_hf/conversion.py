"""Tensor names as `from_pretrained` loads them and as `save_pretrained` stores them, related by transformers'
own checkpoint conversion mapping of the model class (its renamings), never by per-architecture tables."""

from __future__ import annotations

from typing import Any, Iterable


def stored_names(model: Any, names: Iterable[str]) -> dict[str, str]:
    """Loaded name -> the name `save_pretrained` writes it under, for each of `names` (the model's own names) that
    the class's conversion mapping renames (a vision-language model's `model.language_model.*` is stored as
    `language_model.model.*`). A name a converter touches (tensors fused or split on load) is left as loaded.

    Args:
        model: the model (built on the meta device from its config).
        names: its state-dict keys (and buffers).

    Returns:
        Only the names that differ.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (PrefixChange, WeightConverter, WeightRenaming, apply_converters,
                                                 apply_renamings)

    # What save_pretrained reverts for a model built from its config (revert_weight_conversion): no legacy
    # renaming and no prefix change, in reverse order.
    conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    reverse = [c.reverse_transform() for c in conversions[::-1]]
    renamings = [c for c in reverse if isinstance(c, WeightRenaming)]
    converters = [c for c in reverse if isinstance(c, WeightConverter)]
    out = {}
    for name in names:
        if converters and apply_converters(name, converters)[1] is not None:
            continue
        stored = apply_renamings(name, renamings)
        if stored != name:
            out[name] = stored
    return out
