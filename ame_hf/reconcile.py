"""Reconcile stored tensor names with the layout `save_pretrained` writes, as transformers does on load:
tied aliases, the base-model prefix, and buffers or keys the class ignores, all read from the model class
itself (built on the meta device, no weights), never from per-architecture tables."""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable

from ._differences import flatten
from ._meta_model import UnknownArchitecture, on_meta as _on_meta
from ._saved_layout import saved_keys

logger = logging.getLogger(__name__)

# The config field transformers reads (in each sub-config) to decide whether a model ties its tied keys.
TIE_FLAG = "tie_word_embeddings"


@dataclass(frozen=True, kw_only=True)
class Layout:
    """What one transformers model class stores.

    Attributes:
        architecture: the class name (`GPT2LMHeadModel`).
        keys: the tensor names `save_pretrained` writes (tied aliases left out).
        tied: alias -> the name it is tied to (only ties this config makes).
        prefix: `base_model_prefix` (`transformer`, `model`, `bert`, ...), or "".
        ignored: regular expressions of stored names the class drops on load, and its buffers.
        vocab_keys: the stored tensors indexed by token (input and output embeddings, an output bias).
        tie_flags: the config's `tie_word_embeddings` of itself and each sub-config (dotted keys), defaults
            included: what decides which ties transformers makes.
    """

    architecture: str
    keys: frozenset[str]
    tied: dict[str, str]
    prefix: str
    ignored: tuple[str, ...]
    vocab_keys: frozenset[str] = frozenset()
    tie_flags: tuple[tuple[str, Any], ...] = ()


def model_layout(config: dict[str, Any]) -> Layout:
    """The layout of the config's first architecture, from the class built on the meta device.

    Raises:
        UnknownArchitecture: transformers has no such model type or class (it would need the repo's own
            code, which ame-hf never runs).
    """
    return _layout(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=32)
def _layout(config_json: str) -> Layout:
    cls, cfg, model = _on_meta(json.loads(config_json))
    tied = dict(model.get_expanded_tied_weights_keys(all_submodels=True) or {})
    state = set(model.state_dict())
    buffers = {name for name, _ in model.named_buffers()}
    ignored = [*(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []),
               *(re.escape(b) + "$" for b in buffers)]
    keys = saved_keys(json.loads(config_json), state - set(tied))  # fused MoE experts: as saved, per expert
    embeddings = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    vocab_params = {id(getattr(m, attr)) for m in embeddings for attr in ("weight", "bias")
                    if getattr(m, attr, None) is not None}
    vocab = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in vocab_params} & keys
    return Layout(architecture=cls.__name__, keys=keys, tied=tied, prefix=getattr(cls, "base_model_prefix", "") or "",
                  ignored=tuple(ignored), vocab_keys=frozenset(vocab), tie_flags=tie_flags(cfg.to_dict()))


def label_tensors(config: dict[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
    """Which tensors of the config's class are indexed by label, from the class itself: built (on the meta device)
    with one label more, the tensors whose first dimension grows by one hold a row per label; those that change
    otherwise (a label-by-label matrix) are returned second.

    Raises:
        UnknownArchitecture: as `model_layout`.
    """
    return _label_tensors(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=32)
def _label_tensors(config_json: str) -> tuple[frozenset[str], frozenset[str]]:
    config = {k: v for k, v in json.loads(config_json).items() if k not in ("id2label", "label2id", "num_labels")}
    shapes = []
    for count in (2, 3):
        labels = {i: f"LABEL_{i}" for i in range(count)}
        _, _, model = _on_meta({**config, "id2label": labels, "label2id": {v: k for k, v in labels.items()}})
        shapes.append({k: tuple(v.shape) for k, v in model.state_dict().items()})
    two, three = shapes
    rows = {k for k in two if k in three and two[k] and three[k][0] == two[k][0] + 1 and three[k][1:] == two[k][1:]}
    return frozenset(rows), frozenset(k for k in two if three.get(k, two[k]) != two[k]) - rows


def tie_flags(config: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The `tie_word_embeddings` values a config states (dotted keys, sorted): configs that agree on them make
    the same ties."""
    return tuple((k, v) for k, v in sorted(flatten(config).items()) if k.rsplit(".", 1)[-1] == TIE_FLAG)


@dataclass(frozen=True, kw_only=True)
class Renaming:
    """How one checkpoint's stored names map onto a layout.

    Attributes:
        names: layout name -> stored name, for every tensor the checkpoint provides.
        dropped: stored names the layout does not keep (tied aliases, ignored buffers), with why.
        unexpected: stored names that fit nowhere in the layout.
        missing: layout names the checkpoint does not provide.
    """

    names: dict[str, str]
    dropped: dict[str, str]
    unexpected: list[str]
    missing: list[str]

    @property
    def is_identity(self) -> bool:
        return not self.dropped and all(k == v for k, v in self.names.items())


def rename(stored: Iterable[str], layout: Layout) -> Renaming:
    """Map stored tensor names onto `layout` the way transformers' loading does.

    A name is kept if the layout has it; else with the base-model prefix added or removed (a `GPT2Model`
    checkpoint next to a `GPT2LMHeadModel`); a tied alias is dropped when its target is stored too, and
    stands for its target otherwise; buffers and keys the class ignores on load are dropped.
    """
    stored = list(stored)
    names: dict[str, str] = {}
    dropped: dict[str, str] = {}
    unexpected: list[str] = []
    prefix = layout.prefix + "." if layout.prefix else ""
    candidates = {s: _candidates(s, prefix) for s in stored}
    resolved = {s: next((c for c in candidates[s] if c in layout.keys or c in layout.tied), None) for s in stored}
    present = {r for r in resolved.values() if r in layout.keys}
    for s in stored:
        target = resolved[s]
        if target in layout.keys:
            names.setdefault(target, s)
        elif target in layout.tied:
            source = layout.tied[target]
            if source in present or source in names:
                dropped[s] = f"tied to {source}"
            else:
                names[source] = s
        elif any(re.search(p, s) for p in layout.ignored):
            dropped[s] = f"ignored by {layout.architecture} on load"
        else:
            unexpected.append(s)
    missing = sorted(layout.keys - set(names))
    return Renaming(names=names, dropped=dropped, unexpected=sorted(unexpected), missing=missing)


def _candidates(name: str, prefix: str) -> list[str]:
    out = [name]
    if prefix:
        out.append(name[len(prefix):] if name.startswith(prefix) else prefix + name)
    return out


def untied(renaming: Renaming, own: Layout, untie: dict[str, str]) -> tuple[Renaming, list[str]]:
    """A checkpoint whose own config ties `alias -> target` seen in an output that stores the alias (other
    ingredients train it): its alias is what transformers loads for it, the stored alias when it has one (kept
    when it differs from the target, the same values otherwise), else its target. Returns the renaming and the
    aliases so taken from their target."""
    names, taken = dict(renaming.names), []
    for alias, target in sorted(own.tied.items()):
        if alias in untie and alias not in names and target in names:
            names[alias] = names[target]
            taken.append(alias)
    missing = [m for m in renaming.missing if m not in names]
    return Renaming(names=names, dropped=renaming.dropped, unexpected=renaming.unexpected, missing=missing), taken
