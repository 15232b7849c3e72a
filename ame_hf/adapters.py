"""PEFT LoRA adapters as ingredients: a view over the base checkpoint whose tensors read as what peft's
`merge_and_unload()` gives, `W_base + delta`, the delta computed per block of rows from the adapter's factors as peft
computes it (scaling `alpha / r` or rsLoRA `alpha / sqrt(r)`, rank/alpha patterns, Linear, transposed Conv1D,
Embedding and ConvNd factors); `modules_to_save`, trained biases and stored base layers (a resized vocabulary too)
replace the base's tensor. Whatever else an adapter holds or its config sets is refused by name. Never a whole
merged model."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from ._adapter_config import MERGE_FIRST, adapter_refusals, module_pattern, read_adapter_config
from ._lora_delta import Lora as _Lora
from ._lora_delta import lora_delta
from ._param_lora import param_loras
from ._text_config import vocab_size, with_vocab_size
from .checkpoint import Checkpoint, TensorInfo
from .errors import CheckpointError
from .reconcile import Layout, model_layout

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_FILES = ADAPTER_WEIGHTS  # what a Hub adapter repo adds to its light files
_PREFIX = "base_model.model."


class AdapterCheckpoint(Checkpoint):
    """A LoRA adapter seen as the full model peft makes of its base (`PeftModel.from_pretrained(base, adapter)
    .merge_and_unload()`): the base's tensor names; each read block is the base's block (or the adapter's stored
    copy: `modules_to_save`, trained biases, a resized embedding) plus the adapter's low-rank delta for those rows.

    What cannot be made equal to peft's merge is listed in `refusals` (one line each), which `check` reports.

    Args:
        adapter: the adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
        base: the base checkpoint (opened, or known from its headers for a check).
        name: the adapter as the user named it.

    Raises:
        CheckpointError: its config is one `adapter_refusals` refuses, or its weights cannot be read.
    """

    def __init__(self, adapter: Path, base: Checkpoint, name: str, *,  # noqa: D107 (not Checkpoint's)
                 adapter_config: dict[str, Any] | None = None) -> None:
        self.adapter_path, self.name = Path(adapter), name
        self.adapter_config = adapter_config if adapter_config is not None else read_adapter_config(
            self.adapter_path, name)
        refused = adapter_refusals(name, self.adapter_config)
        if refused:
            raise CheckpointError(refused[0], path=self.adapter_path)
        self.vocab_rows: int | None = None  # the rows of its token-indexed tensors when it resized the vocabulary
        self._take_base(base)
        self.replaced: dict[str, torch.Tensor] = {}
        self.loras: dict[str, _Lora] = {}
        self.stored_token_rows: dict[str, torch.Tensor] = {}  # trainable_token_indices: module weight -> trained rows
        self.refusals: list[str] = []
        factors = self._split(_load_adapter_tensors(self.adapter_path, name))
        self.tensors = dict(base.tensors)
        self._replace()
        self._take_base(base)  # its config, with the vocabulary the adapter resized to
        params, refused = param_loras(base.config, self.adapter_config, factors, name)  # target_parameters
        self.refusals += refused + [f"{name}: the adapter changes {k!r}, which the base {base.name} lacks"
                                    for k in params if k not in self.tensors]
        self.loras.update({k: _Lora(**v) for k, v in params.items() if k in self.tensors})
        self._collect(factors)
        self._trainable_tokens()
        self.stored = {n: n for n in self.tensors}

    def _take_base(self, base: Checkpoint) -> None:
        self.base, self.header_only = base, base.header_only
        self.path, self.variant = base.path, base.variant
        self.config = base.config if self.vocab_rows is None else with_vocab_size(base.config, self.vocab_rows)
        self.format, self.files, self.unsupported = base.format, base.files, dict(base.unsupported)
        self._bin, self.reads = None, base.reads  # reading an adapter's block reads its base's

    def with_base(self, base: Checkpoint) -> "AdapterCheckpoint":
        """The same adapter (its factors as loaded) over `base`: the checked base, now opened from its files."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._take_base(base)
        view.tensors = {n: (i if n in self.replaced else base.tensors[n]) for n, i in self.tensors.items()}
        return view

    # -- what the adapter holds ---------------------------------------------------------------
    def _split(self, raw: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The LoRA factors by module; every other stored tensor goes to `replaced` under the base's name."""
        # peft's TrainableTokens wraps the module as `token_adapter`: its base layer is the module's weight
        names = {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k).replace(".token_adapter.", "."): k for k in raw}
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for name, key in names.items():
            if name.endswith(".trainable_tokens_delta"):
                self.stored_token_rows[name[:-len("trainable_tokens_delta")] + "weight"] = raw[key]
                continue
            match = re.match(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$",
                             name)
            wrapped = re.match(r"(.+)\.(?:modules_to_save|original_module)\.(.+)$", name)
            if match:
                factors.setdefault(match.group(1), {})[match.group(2)] = raw[key]
            elif "lora_magnitude_vector" in name or ".lora_" in name:
                self.refusals.append(f"{self.name}: adapter tensor {key!r} is not a LoRA factor ame-hf knows; "
                                     f"{MERGE_FIRST}")
            elif wrapped and f"{wrapped.group(1)}.{wrapped.group(2)}" in names:
                # peft (resized vocabulary) also saves a modules_to_save module's wrapper copies; it loads the plain
                # key into the module `merge_and_unload` keeps, the copies into nothing it keeps.
                continue
            else:  # modules_to_save, trained biases, or a stored base layer: they replace the base's tensor
                self.replaced[name.replace(".base_layer.", ".")] = raw[key]
        return factors

    def _replace(self) -> None:
        """The base's tensors the adapter stores: each must be one the loaded model has; a resized vocabulary
        must come with every token-indexed tensor (peft loads it on a resized base, whose new rows are random)."""
        base = self.base
        self.replaced = {self._base_name(k): v for k, v in self.replaced.items()}
        unlike = any(k not in base.tensors or tuple(v.shape) != base.tensors[k].shape for k, v in self.replaced.items())
        layout = _layout(base.config) if unlike else None  # only then is the model class asked
        for key in list(self.replaced):
            if key in base.tensors:
                continue
            source = layout.tied.get(key) if layout else None
            if source in base.tensors and source in self.replaced:
                alias = self.replaced.pop(key)  # a tied alias saved next to its source: one tensor when loaded
                if not torch.equal(alias, self.replaced[source]):
                    self.refusals.append(f"{self.name}: adapter tensors {key!r} and {source!r} are tied in the base "
                                         f"{base.name} but differ; {MERGE_FIRST}")
            elif source in base.tensors:
                self.replaced[source] = self.replaced.pop(key)
            else:
                self.refusals.append(f"{self.name}: adapter tensor {key!r} has no counterpart in the base "
                                     f"{base.name}; {MERGE_FIRST}")
        resized = {k: tuple(v.shape) for k, v in self.replaced.items()
                   if k in base.tensors and tuple(v.shape) != base.tensors[k].shape}
        if resized:
            self._resized(resized, layout)
        for key, value in self.replaced.items():
            if key in base.tensors:
                self.tensors[key] = TensorInfo(file="", shape=tuple(value.shape), dtype=base.tensors[key].dtype)

    def _resized(self, resized: dict[str, tuple[int, ...]], layout: Layout | None) -> None:
        base = self.base
        vocab = {k for k in (layout.vocab_keys if layout else ()) if k in base.tensors}
        other = sorted(k for k, shape in resized.items() if k not in vocab or shape[1:] != base.tensors[k].shape[1:])
        rows = sorted({resized[k][0] for k in resized})
        if other or len(rows) > 1:
            name = other[0] if other else sorted(resized)[0]
            self.refusals.append(f"{self.name}: adapter tensor {name!r} has shape {list(resized[name])}, the base's "
                                 f"{list(base.tensors[name].shape)}; ame-hf cannot tell the model peft would load; "
                                 f"{MERGE_FIRST}")
            return
        lacking = sorted(vocab - set(resized))
        if lacking:
            before = base.tensors[sorted(resized)[0]].shape[0]
            self.refusals.append(
                f"{self.name} resized the vocabulary to {rows[0]} rows (the base has {before}) but does not store "
                f"{', '.join(lacking)}: peft loads it on a resized base whose new rows are random; save the adapter "
                f"with those modules in modules_to_save (or save_embedding_layers=True), or {MERGE_FIRST}")
        elif vocab_size(base.config) is None:
            self.refusals.append(f"{self.name} resized the vocabulary to {rows[0]} rows, but the config of its base "
                                 f"{base.name} has no vocab_size (in its text config) to record it in; {MERGE_FIRST}")
        else:
            self.vocab_rows = rows[0]

    def _trainable_tokens(self) -> None:
        """peft's TrainableTokens (`trainable_token_indices`): `merge_and_unload` writes the trained rows over the
        module's weight at their indices (`index_copy`); a tied module's copy is its source's."""
        spec = self.adapter_config.get("trainable_token_indices")
        layout = _layout(self.base.config) if any(k not in self.tensors for k in self.stored_token_rows) else None
        rows: dict[str, tuple[list[int], torch.Tensor]] = {}
        if spec and not self.stored_token_rows:
            self.refusals.append(f"{self.name} sets trainable_token_indices but stores no trained token rows "
                                 f"(trainable_tokens_delta); {MERGE_FIRST}")
        for key, values in sorted(self.stored_token_rows.items(), key=lambda kv: kv[0] not in self.tensors):
            source = key if key in self.tensors else (layout.tied.get(key) if layout else None)
            module = key[:-len(".weight")]
            indices = spec if isinstance(spec, list) else next(
                (v for k, v in (spec or {}).items() if module == k or module.endswith("." + k)), None)
            if source in rows and key != source:  # the tied module's copy: the same rows
                if not torch.equal(values, rows[source][1]):
                    self.refusals.append(f"{self.name}: the trainable tokens of {key!r} and its tied {source!r} "
                                         f"differ; {MERGE_FIRST}")
                continue
            if source not in self.tensors or indices is None or len(indices) != values.shape[0] or source in self.loras \
                    or len(set(indices)) != len(indices) or not 0 <= min(indices) <= max(indices) < self.tensors[source].shape[0]:
                self.refusals.append(f"{self.name}: trainable tokens {key!r} ({values.shape[0]} rows) do not fit "
                                     f"trainable_token_indices {spec} over the base {self.base.name}; {MERGE_FIRST}")
                continue
            rows[source] = (list(indices), values)
        self.trained_rows = rows

    def _base_name(self, name: str) -> str:
        """`name` as the base's files store it: peft names tensors as transformers loads the base, which renames
        some on load (its conversion mapping: a vision-language model's language model), the files keep the names
        `save_pretrained` writes."""
        if name in self.base.tensors:
            return name
        layout = _layout(self.base.config)
        return layout.stored_as.get(name, name) if layout else name

    def _collect(self, factors: dict[str, dict[str, torch.Tensor]]) -> None:
        cfg = self.adapter_config
        for module, parts in factors.items():
            embedding = "lora_embedding_A" in parts
            a = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
            b = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
            key = self._base_name(f"{module}.weight")
            if a is None or b is None:
                self.refusals.append(f"{self.name}: module {module!r} has only one LoRA factor; it is incomplete")
                continue
            if key not in self.tensors:
                self.refusals.append(f"{self.name}: the adapter targets {key!r}, which the base {self.base.name} lacks")
                continue
            rank = a.shape[0]
            r = module_pattern(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
            alpha = module_pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
            if r != rank:
                self.refusals.append(f"{self.name}: module {module!r} has rank-{rank} factors, but its config says "
                                     f"r={r} (peft cannot load it)")
                continue
            scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            lora = self._lora(module, a, b, self.tensors[key].shape, embedding, scaling)
            if lora is None:
                continue
            self.loras[key] = lora
            if "lora_B.bias" in parts:
                if self._base_name(f"{module}.bias") not in self.tensors:
                    self.refusals.append(f"{self.name}: module {module!r} has a LoRA bias (lora_bias) but the base "
                                         f"{self.base.name} has no {module}.bias (peft cannot merge it either)")
                    continue
                self.loras[self._base_name(f"{module}.bias")] = _Lora(a=a, b=b, scaling=scaling, rows_from_a=False,
                                                     bias=parts["lora_B.bias"])

    def _lora(self, module: str, a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...], embedding: bool,
              scaling: float) -> _Lora | None:
        """How peft merges the factors into the module's weight of `shape`, as peft decides it: by the kind of the
        base module (an embedding, a ConvNd, a Linear, or transformers' transposed Conv1D), never by the config."""
        rank = a.shape[0]
        if embedding:  # W [num_embeddings, dim] = (B @ A).T
            fits, transposed = shape == (a.shape[1], b.shape[0]), True
        elif a.dim() > 2:  # ConvNd: A a conv of W's kernel, B a 1x1 conv; W [out, in, *kernel]
            if b.shape[1] != rank:
                self.refusals.append(f"{self.name}: module {module!r} is a grouped convolution; peft cannot merge "
                                     "LoRA into it (groups > 1): use the adapter unmerged")
                return None
            if shape != (b.shape[0], *a.shape[1:]) or any(k != 1 for k in b.shape[2:]):
                self.refusals.append(f"{self.name}: module {module!r} has LoRA factors of shapes {list(a.shape)} and "
                                     f"{list(b.shape)}, which do not fit its weight {list(shape)}")
                return None
            return _Lora(a=a.reshape(rank, -1), b=b.reshape(b.shape[0], rank), scaling=scaling, rows_from_a=False,
                         shape=shape[1:])
        else:  # Linear: W [out, in] = B @ A; transformers' Conv1D keeps W as [in, out] and peft transposes the delta
            plain, flipped = shape == (b.shape[0], a.shape[1]), shape == (a.shape[1], b.shape[0])
            fits, transposed = plain or flipped, flipped
            if plain and flipped:  # square: only the module's class says
                found = _transposed_modules(self.base.config)
                if found is None:
                    self.refusals.append(f"{self.name}: cannot build the base's model class to tell whether "
                                         f"{module!r} keeps its weight transposed (transformers' Conv1D); "
                                         f"{MERGE_FIRST}")
                    return None
                transposed = module in found
        if not fits:
            self.refusals.append(f"{self.name}: module {module!r} has LoRA factors of shapes {list(a.shape)} and "
                                 f"{list(b.shape)}, which do not fit its weight {list(shape)}")
            return None
        return _Lora(a=a, b=b, scaling=scaling, rows_from_a=transposed, shape=shape[1:])

    def describe(self) -> str:
        """One line for `check`: type, rank, alpha and the modules it targets."""
        cfg = self.adapter_config
        # a module's weight, or a parameter (`mlp.experts.down_proj`, 3-D experts saved whole: `a` [experts, r, in])
        targets = sorted({k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1]
                          for k, lora in self.loras.items() if lora.bias is None})
        ranks = sorted({lora.a.shape[-2] for lora in self.loras.values()})
        extra = f", modules_to_save {sorted(cfg.get('modules_to_save') or [])}" if cfg.get("modules_to_save") else ""
        if self.vocab_rows is not None:
            extra += f", vocabulary resized to {self.vocab_rows} rows"
        extra += "".join(f", {len(i)} trainable token row(s) of {k}" for k, (i, _) in self.trained_rows.items())
        return (f"{self.name} is a LoRA adapter (rank {'/'.join(map(str, ranks)) or '?'}, alpha "
                f"{cfg.get('lora_alpha')}{', rsLoRA' if cfg.get('use_rslora') else ''}, targets "
                f"{', '.join(targets) or 'none'}{extra}) on the base {self.base.name}")

    # -- reading ------------------------------------------------------------------------------
    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        stored = self.stored[name]
        info = self.tensors[name]
        dtype = dtype or info.dtype
        if stored in self.replaced:
            value = self.replaced[stored]
            value = value if rows is None or not info.shape else value[rows[0]:rows[1]]
            # peft loads it into the base's parameter: in the base's dtype
            out = value.to(info.dtype).to(dtype, copy=True)
        else:
            out = self.base.read(self.base.stored[stored], rows, dtype=dtype)
        lora = self.loras.get(stored)
        if lora is not None:
            out += lora_delta(lora, rows).to(dtype)
        if stored in self.trained_rows:
            indices, values = self.trained_rows[stored]
            start, stop = rows or (0, info.shape[0])
            for i, index in enumerate(indices):  # peft's index_copy, in the base's dtype
                if start <= index < stop:
                    out[index - start] = values[i].to(info.dtype).to(dtype)
        return out

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({self.name!r} on {self.base.name!r}, {len(self.loras)} LoRA tensor(s))"


def _layout(config: dict[str, Any]) -> Layout | None:
    """The base model class's layout (tied aliases, token-indexed tensors), or None when it cannot be built."""
    try:
        return model_layout(config)
    except Exception:  # noqa: BLE001  no class to ask: what needs it is refused by name
        return None


def _transposed_modules(config: dict[str, Any]) -> frozenset[str] | None:
    """The modules of the base's class that are transformers' `Conv1D` (weight stored `[in, out]`), for which peft
    transposes the delta whatever `fan_in_fan_out` says; None when the class cannot be built."""
    try:
        return _conv1d_modules(json.dumps(config, sort_keys=True, default=str))
    except Exception:  # noqa: BLE001
        return None


@functools.lru_cache(maxsize=8)
def _conv1d_modules(config_json: str) -> frozenset[str]:
    import transformers
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    config = json.loads(config_json)
    cls = getattr(transformers, (config.get("architectures") or [""])[0])
    settings = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "auto_map")}
    with torch.device("meta"):
        model = cls(AutoConfig.for_model(config["model_type"], **settings))
    return frozenset(name for name, module in model.named_modules() if isinstance(module, Conv1D))


def _load_adapter_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    safetensors_file, bin_file = (path / f for f in ADAPTER_WEIGHTS)
    try:
        if safetensors_file.is_file():
            from safetensors.torch import load_file

            return load_file(safetensors_file)
        if bin_file.is_file():
            # weights_only: a pickle from the Hub must never run code.
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
                return state
            raise CheckpointError(f"{name}: {bin_file.name} does not hold a flat state dict of tensors", path=path)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{name}: cannot read the adapter weights safely ({str(err).splitlines()[0]})",
                              path=path) from err
    raise CheckpointError(f"{name}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}) in {path}", path=path)
