"""Reconcile stored tensor names with the layout `save_pretrained` writes, as transformers does on load:
tied aliases, the base-model prefix, and buffers or keys the class ignores, all read from the model class
itself (built on the meta device, no weights), never from per-architecture tables."""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ._differences import flatten
from ._meta_model import UnknownArchitecture, on_meta as _on_meta
from ._saved_layout import saved_keys
from ._text_config import vocab_size, with_vocab_size
from .conversion import stored_names

logger = logging.getLogger(__name__)

# The config field transformers reads (in each sub-config) to decide whether a model ties its tied keys.
TIE_FLAG = "tie_word_embeddings"


@dataclass(frozen=True, kw_only=True)
class Layout:
    """What one transformers model class stores, under the names `save_pretrained` writes (its conversion mapping
    reverted: a vision-language model's `model.language_model.*` is stored as `language_model.model.*`).

    Attributes:
        architecture: the class name (`GPT2LMHeadModel`).
        keys: the tensor names `save_pretrained` writes (tied aliases left out).
        tied: alias -> the name it is tied to (only ties this config makes).
        prefix: `base_model_prefix` (`transformer`, `model`, `bert`, ...), or "".
        ignored: regular expressions of stored names the class drops on load, and its buffers.
        vocab_keys: the stored tensors indexed by token (input and output embeddings, an output bias).
        token_columns: stored tensors indexed by token along their last dimension, every other of size 1 (BART's
            `final_logits_bias`, [1, vocab]), found by building the class with another `vocab_size`.
        token_other: stored tensors indexed by token along another dimension in another way (refused).
        modules: the names of the class's modules (a stored tensor of one of them the class lacks is a stale
            buffer of an older version when it is 0-d, e.g. GPT-2's `attn.masked_bias`).
        tie_flags: the config's `tie_word_embeddings` of itself and each sub-config (dotted keys), defaults
            included: what decides which ties transformers makes.
        stored_as: loaded name -> stored name, for the names the conversion mapping renames (what a PEFT adapter,
            which names tensors as the model is loaded, relates to its base's files by).
    """

    architecture: str
    keys: frozenset[str]
    tied: dict[str, str]
    prefix: str
    ignored: tuple[str, ...]
    vocab_keys: frozenset[str] = frozenset()
    tie_flags: tuple[tuple[str, Any], ...] = ()
    stored_as: dict[str, str] = field(default_factory=dict)
    modules: frozenset[str] = frozenset()
    token_columns: frozenset[str] = frozenset()
    token_other: frozenset[str] = frozenset()


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
    loaded_tied = dict(model.get_expanded_tied_weights_keys(all_submodels=True) or {})
    state = set(model.state_dict())
    buffers = {name for name, _ in model.named_buffers()}
    stored_as = stored_names(model, sorted(state | buffers | set(loaded_tied)))
    stored = lambda name: stored_as.get(name, name)  # noqa: E731
    tied = {stored(a): stored(t) for a, t in loaded_tied.items()}
    ignored = [*_ignored_on_load(model), *(re.escape(stored(b)) + "$" for b in buffers)]
    # Fused MoE experts as saved, per expert (saved_keys); renamed ones as stored (stored_as).
    keys = frozenset(stored(k) for k in saved_keys(json.loads(config_json), state - set(loaded_tied)))
    embeddings = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    vocab_params = {id(getattr(m, attr)) for m in embeddings for attr in ("weight", "bias")
                    if getattr(m, attr, None) is not None}
    vocab = {stored(n) for n, p in model.named_parameters(remove_duplicate=False) if id(p) in vocab_params} & keys
    return Layout(architecture=cls.__name__, keys=keys, tied=tied, prefix=getattr(cls, "base_model_prefix", "") or "",
                  ignored=tuple(ignored), vocab_keys=frozenset(vocab), tie_flags=tie_flags(cfg.to_dict()),
                  stored_as=stored_as, modules=frozenset(stored(n) for n, _ in model.named_modules()),
                  **_token_columns(json.loads(config_json), model, keys, stored))


def _token_columns(config: dict[str, Any], model: Any, keys: frozenset[str],
                   stored: Callable[[str], str]) -> dict[str, frozenset[str]]:
    """The tensors whose size along a dimension other than the first follows `vocab_size` (of the text config, as
    the rows: nested in a vision-language model's): `token_columns` (the last, every other dimension 1) and
    `token_other`."""
    size = vocab_size(config)
    if not isinstance(size, int):
        return {}
    try:
        _, _, wider = _on_meta(with_vocab_size(config, size + 8))
    except Exception:  # noqa: BLE001  the class cannot be built wider: only its embeddings are known
        return {}
    before, after = model.state_dict(), wider.state_dict()
    found = {k for k, v in before.items() if stored(k) in keys and k in after and v.shape[1:] != after[k].shape[1:]}
    columns = {k for k in found if len(before[k].shape) > 1 and set(before[k].shape[:-1]) == {1}
               and after[k].shape[:-1] == before[k].shape[:-1]}
    return {"token_columns": frozenset(map(stored, columns)), "token_other": frozenset(map(stored, found - columns))}


def refuse_token_columns(layout: Layout, names: list[str], errors: list[str]) -> bool:
    """Vocabularies that differ cannot yet be matched along a tensor's other dimension: refused, naming it."""
    if layout.token_other:
        errors.append(f"the vocabularies of {', '.join(names)} differ and {layout.architecture} indexes "
                      f"{', '.join(sorted(layout.token_other))} by token along a dimension other than the first, "
                      "which ame-hf cannot match by token yet; merge ingredients of one tokenizer")
    return bool(layout.token_other)


def _ignored_on_load(model: Any) -> list[str]:
    """The patterns of stored names the model drops on load without a word: its (and its submodules')
    `_keys_to_ignore_on_load_unexpected`, and the old per-layer `rotary_emb.inv_freq` / persistent `position_ids`
    transformers' `_adjust_missing_and_unexpected_keys` adds, found by asking that method itself."""
    from types import SimpleNamespace

    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    probes = ("model.layers.0.self_attn.rotary_emb.inv_freq", "embeddings.position_ids")
    info = SimpleNamespace(missing_keys=set(), unexpected_keys=set(probes))
    try:
        model._adjust_missing_and_unexpected_keys(info)
    except Exception:  # noqa: BLE001  another transformers: its class lists only
        return patterns
    extra = {probes[0]: r"rotary_emb\.inv_freq$", probes[1]: r"(^|\.)position_ids$"}
    return patterns + [extra[p] for p in probes if p not in info.unexpected_keys]


def stale_keys(config: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Whether the config's class drops some of `stored` on load (keys it ignores, stale buffers): then the
    names need reconciling even when every checkpoint stores the same ones. `stored`: name -> TensorInfo.

    Only names a layer's own tensors never have ask the class (importing a model class costs a second): one not
    ending in `.weight`, or a `.bias` that is not 1-d (GPT-2's 4-d `attn.bias` mask)."""
    if all(n.endswith(".weight") or (n.endswith(".bias") and len(getattr(i, "shape", ())) == 1)
           for n, i in stored.items()):
        return False
    try:
        return bool(rename(stored, model_layout(config)).dropped)
    except Exception:  # noqa: BLE001  no class to ask: compared as stored
        return False


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
        aliases: tied alias (layout name) -> the stored name dropped for it, its target being stored too (what
            transformers loads untied when the two hold different values: `_loaded_ties`).
    """

    names: dict[str, str]
    dropped: dict[str, str]
    unexpected: list[str]
    missing: list[str]
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        return not self.dropped and all(k == v for k, v in self.names.items())


def rename(stored: Iterable[str], layout: Layout) -> Renaming:
    """Map stored tensor names (or a name -> TensorInfo dict) onto `layout` the way transformers' loading does.

    A name is kept if the layout has it; else with the base-model prefix added or removed (a `GPT2Model`
    checkpoint next to a `GPT2LMHeadModel`), or read as the name the model loads it by (a file saved with the
    loaded names, which the class's conversion mapping leaves as they are); a tied alias is dropped when its
    target is stored too, and stands for its target otherwise; buffers and keys the class ignores on load are
    dropped.
    """
    stored_info = dict(stored) if isinstance(stored, dict) else {}
    stored = list(stored)
    names: dict[str, str] = {}
    dropped: dict[str, str] = {}
    aliases: dict[str, str] = {}
    unexpected: list[str] = []
    prefix = layout.prefix + "." if layout.prefix else ""
    # a file may store a tensor under the name the model loads it by (what the conversion mapping renames to)
    candidates = {s: [n for c in _candidates(s, prefix) for n in (c, layout.stored_as.get(c, c))] for s in stored}
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
                aliases.setdefault(target, s)
            else:
                names[source] = s
        elif any(re.search(p, s) for p in layout.ignored):
            dropped[s] = f"ignored by {layout.architecture} on load"
        elif s.rpartition(".")[0] in layout.modules and _scalar(stored_info.get(s)):
            dropped[s] = f"a buffer older versions stored, which {layout.architecture} does not have or load"
        else:
            unexpected.append(s)
    missing = sorted(layout.keys - set(names))
    return Renaming(names=names, dropped=dropped, unexpected=sorted(unexpected), missing=missing, aliases=aliases)


def _scalar(info: Any) -> bool:
    """A 0-d stored tensor (old GPT-2's `masked_bias`): a constant buffer, never a layer's trained weight (a renamed
    legacy weight, e.g. `LayerNorm.gamma`, which transformers' conversion mapping loads, has a dimension)."""
    return info is not None and tuple(getattr(info, "shape", (0,))) == ()


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
    return Renaming(names=names, dropped=renaming.dropped, unexpected=renaming.unexpected, missing=missing,
                    aliases=renaming.aliases), taken
