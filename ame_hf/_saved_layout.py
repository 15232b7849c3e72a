"""A checkpoint stored in the layout transformers loads into (fused MoE experts: `mlp.experts.gate_up_proj`) seen in
the layout `save_pretrained` writes (`mlp.experts.0.gate_proj.weight`, ...), by transformers' own conversion mapping."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)
_LAYOUT_OPS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten._reshape_alias.default)


def to_saved_layout(ckpt: Any) -> None:
    """Rename `ckpt`'s tensors (in place) to the names `save_pretrained` of the loaded model writes, when transformers
    converts what it stores on load (a fused expert tensor, split per expert): each saved tensor then reads as the
    bytes of the stored tensor it is, and nothing is computed. A conversion that is not a plain split leaves the
    names as stored; a split ame-hf cannot read in place (a `.bin` file) goes to `ckpt.refusals`, by name.

    >>> to_saved_layout(Checkpoint("./qwen3-moe-fused"))  # doctest: +SKIP
    """
    if not _converted(ckpt.config.get("model_type"), sorted(ckpt.tensors)):
        return
    stored = {k: (tuple(i.shape), str(i.dtype)) for k, i in ckpt.tensors.items()}
    try:
        views = _saved_views(json.dumps(ckpt.config, sort_keys=True, default=str), json.dumps(stored, sort_keys=True))
    except Exception as err:  # noqa: BLE001  no class to trace it on: names stay as stored (compared as such)
        logger.debug("%s: cannot trace transformers' conversion (%s)", ckpt.name, err)
        return
    if not isinstance(views, dict):
        # Not a plain split (a Concatenate, a Transpose): names stay as stored, compared as such, as before.
        logger.debug("%s: %s", ckpt.name, views)
        return
    if any(src != new and src in getattr(ckpt, "dequantized", {}) for new, (src, _, _) in views.items()):
        ckpt.refusals = [*getattr(ckpt, "refusals", ()), f"{ckpt.name} stores quantized tensors transformers also "
                         "converts on load (e.g. fused FP8 MoE experts), which ame-hf does not split; load it with "
                         "transformers (dequantize=True) and save_pretrained it, then merge that"]
        return
    # Read by byte offset alone (a header-only checkpoint is never read: its opened files are converted again).
    if ckpt.format != "safetensors" or sys.byteorder != "little" or not ckpt.header_only and any(
            ckpt.tensors[src].offset < 0 for src, _, _ in views.values()):
        ckpt.refusals = [*getattr(ckpt, "refusals", ()), f"{ckpt.name} stores tensors transformers converts on load "
                         "(e.g. fused MoE experts) but not as a safetensors file ame-hf reads in place, so it cannot "
                         "split them; load it with transformers and save_pretrained it, then merge that"]
        return
    tensors = {}
    for new, (src, offset, shape) in views.items():
        info = ckpt.tensors[src]
        start = info.offset + offset * info.dtype.itemsize if info.offset >= 0 else -1
        tensors[new] = dataclasses.replace(info, shape=shape, offset=start)
    # Names are the checkpoint's own from here on (its views rename these); the bytes are found by offset alone.
    ckpt.tensors, ckpt.stored = tensors, {new: new for new in tensors}


def _converted(model_type: str | None, names: list[str]) -> bool:
    """Whether transformers' saving would convert any of these stored names (its reversed converters, matched by
    transformers itself): only then is the model class built."""
    if not _may_convert(model_type):
        return False
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightConverter, apply_converters
    except ImportError:
        return False
    mapping = get_checkpoint_conversion_mapping(model_type) if model_type else None
    converters = [t.reverse_transform() for t in mapping or () if isinstance(t, WeightConverter)]
    return bool(converters) and any(apply_converters(n, converters)[1] is not None for n in names)


def _may_convert(model_type: str | None) -> bool:
    """False when transformers holds no conversion for `model_type`, found without importing it: importing
    `transformers.conversion_mapping` pulls in transformers, torch.distributed and sympy, 73 MiB of a merge's
    peak memory and about 1 s of its start (Llama, Qwen, ...: most models have no conversion). Every model type its
    mapping holds is a quoted literal in that module's source (its dict keys, `_MODEL_TO_CONVERSION_PATTERN`), so
    a model type the file never quotes has none; anything else (the file unreadable, or the module already
    imported: a mapping may have been registered at run time) asks transformers itself."""
    if not model_type:
        return False
    if "transformers.conversion_mapping" in sys.modules:
        return True
    return _quoted(model_type)


@functools.lru_cache(maxsize=64)
def _quoted(model_type: str) -> bool:
    """Whether transformers' `conversion_mapping.py` quotes `model_type` (True when it cannot be read)."""
    spec = importlib.util.find_spec("transformers")  # the top-level package: found, not imported
    if spec is None:
        return False  # no transformers, no conversion (as `_converted` finds when its import fails)
    try:
        text = (Path(next(iter(spec.submodule_search_locations or ()))) / "conversion_mapping.py").read_text("utf-8")
    except (OSError, StopIteration, UnicodeDecodeError):
        return True
    return any(f"{q}{model_type}{q}" in text for q in ('"', "'"))


@functools.lru_cache(maxsize=32)
def _saved_views(config_json: str, stored_json: str) -> dict[str, tuple[str, int, tuple[int, ...]]] | str | None:
    """saved name -> (stored name, element offset of its data in the stored tensor, its shape), None when
    transformers converts none of the stored tensors, or a reason when a saved tensor is not a contiguous piece of a
    stored one."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers.core_model_loading import revert_weight_conversion

    from ._meta_model import on_meta

    class _Aliasing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func is torch.ops.aten.clone.default:
                return args[0]
            # An aliased copy is not contiguous where the real one is: an op that then reads its memory layout
            # (rather than its elements) would trace wrongly, so such a conversion is not traced at all.
            if func in _LAYOUT_OPS and not args[0].is_contiguous() or func is torch.ops.aten.as_strided.default:
                raise ValueError(f"its conversion uses {func} on a split")
            return func(*args, **(kwargs or {}))

    _, _, model = on_meta(json.loads(config_json))
    stored = {k: (tuple(shape), getattr(torch, dtype.split(".")[-1])) for k, (shape, dtype) in
              json.loads(stored_json).items()}
    roots = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in stored.items()}
    plain = revert_weight_conversion(model, dict(roots))  # as save_pretrained: names and shapes it writes
    by_id = {id(t): k for k, t in roots.items()}
    # transformers' reverse conversion copies each split (`.contiguous()`); on the meta device, aliasing that copy
    # keeps every saved tensor a view of the stored one, so torch itself says where its bytes lie.
    with _Aliasing():
        traced = revert_weight_conversion(model, dict(roots))
    if all(roots.get(k) is t for k, t in traced.items()) and set(traced) == set(roots):
        return None  # nothing converted
    if set(plain) != set(traced):
        return "its conversion is not a split"
    views: dict[str, tuple[str, int, tuple[int, ...]]] = {}
    for new, t in traced.items():
        src = by_id.get(id(t)) or by_id.get(id(t._base))
        if src is None or tuple(t.shape) != tuple(plain[new].shape) or not t.is_contiguous():
            return f"{new} is not a contiguous piece of one stored tensor"
        views[new] = (src, t.storage_offset(), tuple(t.shape))
    return views


def saved_pieces(config: dict[str, Any]) -> dict[str, list[tuple[str, int, tuple[int, ...]]]]:
    """For each tensor of the model as transformers loads it (the config's class, on the meta device): the tensors
    `save_pretrained` writes from it, each as (saved name, element offset in the loaded tensor, shape)."""
    return _saved_pieces(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=16)
def _saved_pieces(config_json: str) -> dict[str, list[tuple[str, int, tuple[int, ...]]]]:
    from ._meta_model import on_meta

    state = on_meta(json.loads(config_json))[2].state_dict()
    shapes = {k: (list(v.shape), str(v.dtype)) for k, v in state.items()}
    views = _saved_views(config_json, json.dumps(shapes, sort_keys=True))
    if isinstance(views, str):
        raise ValueError(views)
    views = views or {k: (k, 0, tuple(v.shape)) for k, v in state.items()}
    pieces: dict[str, list[tuple[str, int, tuple[int, ...]]]] = {}
    for saved, (loaded, offset, shape) in sorted(views.items()):
        pieces.setdefault(loaded, []).append((saved, offset, shape))
    return pieces


def saved_keys(config: dict[str, Any], keys: set[str]) -> frozenset[str]:
    """The names `save_pretrained` writes for these tensors of the loaded model (each fused expert tensor: its
    per-expert tensors); the names themselves when transformers converts none, or not by a plain split."""
    if not _converted(config.get("model_type"), sorted(keys)):
        return frozenset(keys)
    try:
        pieces = saved_pieces(config)
    except Exception:  # noqa: BLE001  not a plain split: checkpoints stored so are refused by name
        return frozenset(keys)
    return frozenset(saved for k in keys for saved, _, _ in pieces.get(k, [(k, 0, ())]))
