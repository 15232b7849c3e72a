"""LoRA on parameters (peft's `target_parameters`: fused MoE experts, a router's weight) as deltas of the tensors
`save_pretrained` writes: peft's own wrappers, built on the meta device, say each factor pair's parameter, expert count,
orientation and scaling; transformers' conversion mapping says which piece of that parameter each saved tensor is."""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from typing import Any

import torch

from ._saved_layout import saved_pieces

_MERGE_FIRST = "merge_and_unload it with peft first and merge that full model"


@dataclasses.dataclass(frozen=True)
class _Wrapper:
    parameter: str           # the parameter as transformers loads it (`model.layers.0.mlp.experts.down_proj`)
    rank: int
    scaling: float
    out_first: bool          # each expert's delta is [out, in] (peft swapped its features), else [in, out]
    shape: tuple[int, ...]   # the parameter's shape, as [experts, d1, d2] ([1, out, in] for a 2-D one)


def param_loras(base_config: dict[str, Any], adapter_config: dict[str, Any], factors: dict[str, dict[str, Any]],
                name: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Take from `factors` (module -> its stored LoRA tensors) those of peft's parameter wrappers; return, per saved
    tensor they change, the arguments of its low-rank delta (`a` [r, in], `b` [rows, r], `scaling`, `rows_from_a`;
    per expert for whole experts: `experts`),
    and why any cannot be computed exactly (one line each).

    peft's delta of an expert `e` (`ParamWrapper.get_delta_weight`): `A` [r·E, in] read as [E, r, in] and `B`
    [out, r·E] as [out, r, E], so `delta[e] = scaling * B[:, :, e] @ A[e]` where peft swapped the parameter's
    features (its experts kept [out, in]), its transpose where it did not (transformers' `is_transposed` experts,
    GPT-OSS's [in, out]). A saved tensor is rows of one expert's matrix, or whole experts (a 3-D tensor saved as
    loaded, rows being experts).
    """
    if not adapter_config.get("target_parameters"):
        return {}, []
    if adapter_config.get("fan_in_fan_out"):
        return {}, [f"{name} sets fan_in_fan_out with target_parameters, whose delta peft does not transpose the same "
                    f"way for every parameter; {_MERGE_FIRST}"]
    try:
        wrappers = _wrappers(json.dumps(base_config, sort_keys=True, default=str),
                             json.dumps(adapter_config, sort_keys=True, default=str))
        pieces = saved_pieces(base_config)
    except Exception as err:  # noqa: BLE001  no model to ask: refused by name
        return {}, [f"{name}: cannot build its base's model with peft's parameter wrappers to read its "
                    f"target_parameters factors ({str(err).splitlines()[0] if str(err) else type(err).__name__})"]
    out: dict[str, dict[str, Any]] = {}
    refusals = []
    for module, wrapper in wrappers.items():
        parts = factors.pop(module, None)
        where = f"{name}: target_parameters {wrapper.parameter!r}"
        if parts is None or set(parts) != {"lora_A.weight", "lora_B.weight"}:
            refusals.append(f"{where} has factors {sorted(parts or ())} (ame-hf computes lora_A and lora_B only); "
                            f"{_MERGE_FIRST}")
            continue
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        experts, d1, d2 = wrapper.shape
        dims_in, dims_out = (d2, d1) if wrapper.out_first else (d1, d2)
        if tuple(a.shape) != (wrapper.rank * experts, dims_in) or tuple(b.shape) != (dims_out, wrapper.rank * experts):
            refusals.append(f"{where} has factors of shapes {list(a.shape)} and {list(b.shape)}, which do not fit it "
                            f"{list(wrapper.shape)} at rank {wrapper.rank} (peft cannot load them)")
            continue
        a_e, b_e = _expert_factors(a, b, wrapper)
        for saved, offset, shape in pieces.get(wrapper.parameter, ()):
            delta = _piece(a_e, b_e, wrapper, offset, shape)
            if delta is None:
                refusals.append(f"{where}: its saved tensor {saved!r} {list(shape)} is neither rows of one expert nor "
                                f"whole experts of {list(wrapper.shape)}; {_MERGE_FIRST}")
            else:
                out[saved] = delta
    return out, refusals


def _expert_factors(a: torch.Tensor, b: torch.Tensor, wrapper: _Wrapper) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's factors per expert: `A` [r·E, in] as [E, r, in], `B` [out, r·E] as [out, r, E], then [E, out, r]."""
    experts = wrapper.shape[0]
    return (a.reshape(experts, wrapper.rank, a.shape[1]),
            b.reshape(b.shape[0], wrapper.rank, experts).permute(2, 0, 1))


def _piece(a_e: torch.Tensor, b_e: torch.Tensor, wrapper: _Wrapper, offset: int,
           shape: tuple[int, ...]) -> dict[str, Any] | None:
    """The delta arguments of the saved tensor at element `offset` of the parameter, of `shape`, from the experts'
    factors (`_expert_factors`): rows `[first, first + n)` of expert `e`'s matrix [d1, d2] (the rows B's when peft
    swapped its features, else A's columns), or experts `[e, e + n)` whole; None when it is neither."""
    experts, d1, d2 = wrapper.shape
    expert, rest = divmod(offset, d1 * d2)
    first, column = divmod(rest, d2)
    if len(shape) == 3 and tuple(shape[1:]) == (d1, d2) and not rest and expert + shape[0] <= experts:
        picked = slice(expert, expert + shape[0])
        return dict(a=a_e[picked].clone(), b=b_e[picked].clone(), rows_from_a=not wrapper.out_first,
                    scaling=wrapper.scaling, experts=True)
    if len(shape) != 2 or shape[1] != d2 or column or first + shape[0] > d1:
        return None
    rows = slice(first, first + shape[0])
    if wrapper.out_first:  # delta[e] [out, in] = B_e @ A_e: the saved rows are B_e's
        return dict(a=a_e[expert].clone(), b=b_e[expert, rows].clone(), rows_from_a=False, scaling=wrapper.scaling)
    # delta[e] [in, out] = (B_e @ A_e).T: the saved rows are A_e's columns
    return dict(a=a_e[expert][:, rows].clone(), b=b_e[expert].clone(), rows_from_a=True, scaling=wrapper.scaling)


@functools.lru_cache(maxsize=8)
def _wrappers(config_json: str, adapter_json: str) -> dict[str, _Wrapper]:
    """module name (as the adapter stores it) -> its parameter wrapper, from peft itself on the meta device."""
    import peft
    from peft.tuners.lora.layer import ParamWrapper

    from ._meta_model import on_meta

    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    config = peft.LoraConfig(**{k: v for k, v in json.loads(adapter_json).items() if k in fields})
    _, _, model = on_meta(json.loads(config_json))
    with torch.device("meta"), warnings.catch_warnings():  # peft's notes on patterns: for its own load to say
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(config, model, adapter_name="default", low_cpu_mem_usage=True)
    out = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        base = module.get_base_layer()
        owner = next(n for n, m in model.named_modules() if m is base)
        shape = tuple(getattr(base, module.parameter_name).shape)
        out[module_name] = _Wrapper(
            parameter=f"{owner}.{module.parameter_name}".replace(".base_layer", ""),
            rank=module.r["default"], scaling=float(module.scaling["default"]),
            out_first=len(shape) == 2 or module._did_swap_in_out_features,
            shape=shape if len(shape) == 3 else (1, *shape))
    return out
