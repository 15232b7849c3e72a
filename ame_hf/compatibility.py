"""Compatibility report: can these checkpoints be merged, and if not, every reason why.

Reads only configs, tensor names/shapes/dtypes (a safetensors header is enough) and tokenizer files.
Reconciles the layouts transformers reconciles on load (`reconcile`); tensor shapes decide errors,
other config differences are notes; quantized weights and remote-code architectures are refused.
`merge` runs the same check first and refuses with the same report.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from ._differences import differing_fields, file_notes, updated, who_has
from ._loaded_ties import loose_aliases, untie_loaded, untied_layout
from ._text_config import vocab_size
from .checkpoint import DTYPE_NAMES, Checkpoint
from .dequantize import QUANTIZED_HINT, describe, quantization_refusal
from .labels import match_labels
from .report import CompatibilityReport
from .reconcile import (TIE_FLAG, Layout, Renaming, UnknownArchitecture, model_layout,
                        refuse_token_columns, rename, stale_keys, tie_flags, untied)
from .vocabulary import (TokenizerFiles, compare_tokenizers, past_rows_line, plan_vocabulary, read_tokenizer,
                         token_ids, tokens_past_rows)

# Config keys whose difference means another architecture: errors. Any other difference is a note,
# since the tensors' shapes (compared one by one) decide whether weights can be averaged.
ARCHITECTURE_KEYS = ("model_type",)
# Config keys that say nothing about the model (bookkeeping): differences are not even notes.
QUIET_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype"}
_MAX_LISTED = 20
GENERATION_CONFIG = "generation_config.json"  # transformers.utils.GENERATION_CONFIG_NAME


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def check_compatibility(
    checkpoints: Sequence[Checkpoint],
    *,
    pivot: Checkpoint | None = None,
    allow_dtype_mismatch: bool = False,
    tokenizer_source: str | int | TokenizerFiles = "auto",
    tokenizers: Sequence[TokenizerFiles] | None = None,
    pivot_index: int = 0,
) -> CompatibilityReport:
    """Compare every ingredient with the first one (after reconciling their layouts), and the pivot.

    Args:
        checkpoints: the ingredients (opened, or known from their headers).
        pivot: another checkpoint to start from (e.g. the base model), if any.
        allow_dtype_mismatch: dtype differences become notes (an explicit output dtype was chosen).
        tokenizer_source: whose vocabulary the output keeps when vocabularies differ (`auto` and `union`:
            the union; `first`, `pivot` or an index: that ingredient's; the `TokenizerFiles` of another
            checkpoint: its vocabulary, every row merged from the ingredients that have its token).
        tokenizers: each checkpoint's tokenizer files (the ingredients', then the pivot's), as the input stage
            read them (an adapter without its own: its base's); default: read from each checkpoint's folder.
        pivot_index: the ingredient the pivot keyword names (`first`: 0, an index: it): the output's config
            comes from it when there is no pivot checkpoint (`CompatibilityReport.config_source`).

    >>> report = check_compatibility([Checkpoint("a"), Checkpoint("b")])  # doctest: +SKIP
    >>> print(report.format())                                            # doctest: +SKIP
    """
    everything = [*checkpoints, *([pivot] if pivot else [])]
    report = CompatibilityReport(names=[c.name for c in everything])
    if not checkpoints:
        report.errors.append("no checkpoints given")
        return report
    for ckpt in dict.fromkeys(everything):  # an ingredient given twice: refused once
        report.errors += _refusals(ckpt)
    if report.errors:
        return report
    views, pivot_view, report.source = _reconcile(list(checkpoints), pivot, report)
    if report.errors:
        return report
    report.checkpoints, report.pivot, report.pivot_index = views, pivot_view, pivot_index
    match_labels(report)  # rows of a classifier head read in one label order
    if report.errors:
        return report
    views, pivot_view = report.checkpoints, report.pivot
    if tokenizers is None:  # read once: the vocabulary plan and the notes
        tokenizers = [read_tokenizer(c.path) for c in everything]
    _vocabulary(views, tokenizers[:len(views)], report, tokenizer_source)
    compared = [*views, *([pivot_view] if pivot_view else [])]
    taken = report.config_source().name
    _check_untied(report)
    _compare_configs(compared, report, taken)
    report.notes += file_notes(GENERATION_CONFIG, [c.name for c in compared], [c.path for c in compared],
                               taken=taken, skip=(*QUIET_KEYS, "_from_model_config"))
    ref = views[0]
    for other in views[1:]:
        _compare_tensors(ref, other, report)
    _compare_dtypes(views, report, allow_dtype_mismatch)
    if pivot_view is not None:
        _compare_pivot(ref, pivot_view, report)
    report.notes += compare_tokenizers([c.name for c in everything], tokenizers)
    report.notes[:0] = [line for c in dict.fromkeys(everything) if (line := describe(c))]  # FP8, MXFP4: one line
    return report


def _refusals(ckpt: Checkpoint) -> list[str]:
    """Quantized weights, architectures only the repo's own code defines, and what an adapter's tensors cannot make
    equal to peft's merge (`AdapterCheckpoint.refusals`): refused, one line each."""
    out = config_refusals(ckpt.name, ckpt.config)
    if ckpt.unsupported and not out:
        dtypes = ", ".join(sorted(set(ckpt.unsupported.values())))
        out.append(f"{ckpt.name} holds {dtypes} tensors (quantized or FP8) without the quantization_config and "
                   f"scales transformers dequantizes; {QUANTIZED_HINT}")
    return out + list(getattr(ckpt, "refusals", ()))


def config_refusals(name: str, config: dict[str, Any]) -> list[str]:
    """What `config.json` alone refuses (so nothing else need be read): quantized weights, and an
    architecture only the repo's own code defines."""
    out = [why for why in [quantization_refusal(name, config)] if why]  # FP8 and MXFP4 merge, dequantized
    if config.get("auto_map") is not None:
        try:
            model_layout({**config, "architectures": config.get("architectures") or []})
        except UnknownArchitecture as err:
            out.append(f"{name}: {err}: it needs the repo's own code (auto_map), which ame-hf never runs; "
                       "merge checkpoints of an architecture transformers has")
        except Exception:  # noqa: BLE001  a known type whose class cannot be built here: not remote code
            pass
    return out


def _reconcile(checkpoints: list[Checkpoint], pivot: Checkpoint | None,
               report: CompatibilityReport) -> tuple[list[Checkpoint], Checkpoint | None, int]:
    """The ingredients and the pivot under the output's tensor names, and the index of the ingredient whose
    layout (and config) the output takes: the one that explains every ingredient's tensors best, and stores every
    tensor an ingredient trains (a head one ingredient ties to its embeddings and another stores is untied)."""
    names = [frozenset(c.tensors) for c in checkpoints]
    archs = [tuple(c.config.get("architectures") or ()) for c in checkpoints]
    # A config without `architectures` (some older saves) takes those of an ingredient of its model type.
    known = {c.config.get("model_type"): a for c, a in zip(checkpoints, archs) if a}
    archs = [a or known.get(c.config.get("model_type"), ()) for c, a in zip(checkpoints, archs)]
    kinds = [(a, tie_flags(c.config)) for a, c in zip(archs, checkpoints)]  # same kind: same layout
    same = len(set(names)) == 1 and len(set(kinds)) == 1 and (pivot is None or frozenset(pivot.tensors) == names[0])
    same = same and not (all(archs) and stale_keys({**checkpoints[0].config, "architectures": [*archs[0]]}, checkpoints[0].tensors))
    # A config that ties may store the alias with values of its own, which transformers loads untied.
    if not all(archs) or same and not any(v is True for kind in kinds for _, v in kind[1]):
        return checkpoints, pivot, 0  # nothing to reconcile (or nothing to reconcile it with)
    layouts: dict[tuple, Layout] = {}
    for ckpt, kind in zip(checkpoints, kinds):
        try:
            layouts.setdefault(kind, model_layout({**ckpt.config, "architectures": list(kind[0])}))
        except Exception as err:  # noqa: BLE001  transformers cannot build it: compare names as stored
            if same:
                return checkpoints, pivot, 0
            report.notes.append(f"{ckpt.name}: cannot build {kind[0][0]} to reconcile its layout ({err}); "
                                "tensor names are compared as stored")
            return checkpoints, pivot, 0
    loose = [loose_aliases(c, layouts[k]) for c, k in zip(checkpoints, kinds)]
    if same and not any(loose):  # (a store of every alias by all, unread: the output stores them too, as loaded)
        return checkpoints, pivot, 0
    loaded_untied = untie_loaded(checkpoints, kinds, layouts, loose, report)
    if loaded_untied is None:
        return checkpoints, pivot, 0
    report.unread_ties = [c.name for c, found in zip(checkpoints, loose) if found is None]
    report.notes += [f"{name} stores a tensor its config ties ({TIE_FLAG}) beside the one it ties it to: transformers "
                     "loads it untied if their values differ, which is compared once its weights are downloaded"
                     for name in report.unread_ties]
    layouts = {k: layouts[k] for k in kinds}
    own = [layouts[k] for k in kinds]
    # Tied in one ingredient, stored (trained) by another: the output stores it.
    untie = {a: t for lay in own for a, t in lay.tied.items() if any(a in other.keys for other in own)}
    untie.update(loaded_untied)  # (stored by every ingredient, but loaded untied: the output is untied too)
    fit = {k: lay for k, lay in layouts.items() if not set(lay.tied) & set(untie)}
    if not fit:
        report.errors.append(f"the ingredients tie and store {_listed(sorted(untie))} crosswise: no one layout stores "
                             "every trained tensor; merge ingredients that all tie, or all untie, their embeddings")
        return checkpoints, pivot, 0
    cost = {k: sum(len(r.unexpected) + len(r.missing) for r in (rename(c.tensors, lay) for c in checkpoints))
            for k, lay in fit.items()}
    # Fewest names left unexplained; on a tie the richer class (a head over its bare base model).
    source = min((i for i in range(len(checkpoints)) if kinds[i] in fit), key=lambda i: (
        cost[kinds[i]], -len(layouts[kinds[i]].keys | set(layouts[kinds[i]].tied)), i))
    layout = layouts[kinds[source]]
    if untie:
        report.config_updates.update(layout.tie_flags)
        report.config_said.update(k for k, _ in layout.tie_flags)
    everything = [*checkpoints, *([pivot] if pivot else [])]
    if pivot is not None:  # a pivot that ties what the output unties starts it from its target
        own.append(_own_layout(pivot, archs[source], report) if untie else layout)
    views = []
    for i, c in enumerate(everything):
        renaming, taken = untied(rename(c.tensors, layout), own[i] or layout, untie)
        for alias in taken:
            storing = ", ".join(o.name for o, lay in zip(checkpoints, own) if alias in lay.keys)
            report.notes.append(f"{c.name} ties {alias} to {own[i].tied[alias]} ({TIE_FLAG}), {storing} train(s) "
                                f"its own: the output is untied ({TIE_FLAG} false) and {c.name}'s {alias} is its "
                                f"{own[i].tied[alias]}, as transformers loads it")
        views.append(_view(c, renaming, layout, report, unexpected_ok=i == len(checkpoints), aliases=taken))
    return views[:len(checkpoints)], views[-1] if pivot else None, source


def _own_layout(ckpt: Checkpoint, arch: tuple[str, ...], report: CompatibilityReport) -> Layout | None:
    """The layout of a checkpoint's own config (its architectures, else `arch`) as transformers loads it (a tied
    alias it stores with values of its own untied); None if it cannot be built."""
    config = {**ckpt.config, "architectures": list(ckpt.config.get("architectures") or arch)}
    try:
        layout = model_layout(config)
    except Exception:  # noqa: BLE001  then nothing of it is untied
        return None
    found = loose_aliases(ckpt, layout)
    if found is None:
        report.unread_ties.append(ckpt.name)
    return (untied_layout(layout, config, found) or layout) if found else layout


def _check_untied(report: CompatibilityReport) -> None:
    """An output untied from what some ingredients tie: its config (the source's, with the layout's tie flags)
    must make transformers load every merged tensor as its own."""
    if not report.config_updates:
        return
    source = report.config_source()
    out = model_layout(updated(source.config, report.config_updates))
    still = sorted(set(report.checkpoints[0].tensors) & set(out.tied))
    if still:
        report.errors.append(f"the output must store {_listed(still)} (some ingredients train them, others tie them), "
                             f"but {source.name}'s config with {report.config_updates} still ties them; merge "
                             "ingredients that all tie, or all untie, their embeddings")


def _view(ckpt: Checkpoint, renaming: Renaming, layout: Layout, report: CompatibilityReport, *,
          unexpected_ok: bool, aliases: Sequence[str] = ()) -> Checkpoint:
    """`ckpt` under the layout's names; what was reconciled becomes a note (`aliases`: said already)."""
    if renaming.is_identity and not renaming.unexpected:
        return ckpt
    moved = [s for n, s in renaming.names.items() if n != s and n not in aliases]
    if moved:
        report.notes.append(f"{ckpt.name}: {len(moved)} tensor name(s) taken as {layout.architecture} stores them (base-"
                            f"model prefix {layout.prefix!r}, or its conversion mapping), e.g. {moved[0]!r}")
    for stored, why in sorted(renaming.dropped.items()):
        report.notes.append(f"{ckpt.name}: stored tensor {stored!r} is not used ({why})")
    names = dict(renaming.names)
    if unexpected_ok and renaming.unexpected:
        report.notes.append(f"{ckpt.name}: tensor(s) {_listed(renaming.unexpected)} are not part of "
                            f"{layout.architecture} and are not used")
    else:
        names.update({u: u for u in renaming.unexpected})  # compared below: an extra tensor is an error
    return ckpt.renamed(names)


def _vocabulary(views: Sequence[Checkpoint], tokenizers: Sequence[Any], report: CompatibilityReport,
                source: str | int | TokenizerFiles) -> None:
    """When the ingredients' vocabularies differ (tokens, or rows of the embeddings), plan to match the rows
    of every token-indexed tensor by token string (a note), or say why that cannot be done (an error)."""
    sizes = [vocab_size(c.config) for c in views]
    maps = [token_ids(t) for t in tokenizers]
    if len(set(sizes)) <= 1 and all(m == maps[0] for m in maps):  # one vocabulary; another tokenizer must fit it
        past = tokens_past_rows(source, sizes[0]) if isinstance(source, TokenizerFiles) and isinstance(
            sizes[0], int) else {}
        if past:
            report.errors.append(past_rows_line("the tokenizer of the tokenizer source", past, sizes[0]))
        if past or not isinstance(source, TokenizerFiles) or token_ids(source) in (None, maps[0]):
            return  # else another checkpoint's tokenizer gives tokens other ids: rows matched by token, below
    try:
        layout = model_layout(updated(views[report.source].config, report.config_updates))
    except Exception as err:  # noqa: BLE001  no class to say which tensors are token-indexed
        report.errors.append(f"the vocabularies differ (vocab_size {sizes}) and {views[0].name}'s architecture "
                             f"cannot be built to find its token-indexed tensors ({err})")
        return
    keys = frozenset(k for k in layout.vocab_keys | layout.token_columns if all(k in c.tensors for c in views))
    if not keys or refuse_token_columns(layout, [c.name for c in views], report.errors):
        return
    name = sorted(keys - layout.token_columns)[0]
    counts = [c.tensors[name].shape[0] for c in views]
    union = source in ("auto", "union")
    names = [c.name for c in views]
    index: int | None = 0 if union or source in ("first", "pivot") else source if isinstance(source, int) else None
    if index is None:  # another checkpoint's tokenizer: its vocabulary exactly, every row from the ingredients
        if not isinstance(source, TokenizerFiles) or token_ids(source) is None:
            report.errors.append(f"the vocabularies differ and tokenizer_source={source!r} holds no tokenizer")
            return
        names, tokenizers = [*names, "the tokenizer source"], [*tokenizers, source]
        counts, index = [*counts, len(token_ids(source) or {})], len(views)
    try:
        plan = plan_vocabulary(names, tokenizers, counts, source=index, union=union, columns=keys & layout.token_columns)
    except ValueError as err:
        report.errors.append(str(err))
        return
    past = tokens_past_rows(tokenizers[index], counts[index], plan if union else None) if index < len(views) else {}
    if past:  # the output's tokenizer would name rows it lacks (a union's new tokens, other ids): refused
        report.errors.append(past_rows_line(f"the tokenizer of {views[index].name}", past, counts[index]))
    if index == len(views):  # drop the tokenizer-only source: every row must come from an ingredient
        orphans = [r for r in range(plan.size) if all(rows[r] < 0 for rows in plan.rows[:-1])]
        if orphans:
            report.errors.append(f"the tokenizer source has {len(orphans)} token(s) no ingredient has; choose "
                                 "tokenizer_source='union', 'first' or an ingredient index")
            return
        plan = replace(plan, rows=plan.rows[:-1], new_tokens=[], source=0, tokenizer=source)
    report.vocab, report.vocab_keys = plan, keys
    added = ", ".join(repr(t) for t, _ in plan.new_tokens[:8]) + (" ..." if len(plan.new_tokens) > 8 else "")
    report.notes.append(
        f"the vocabularies differ (rows {counts}): rows of {', '.join(sorted(keys))} are matched by token; the output "
        + (f"has the union of {plan.described} ("
           + (f"{len(plan.new_tokens)} new: {added})" if plan.new_tokens else "no new token)") if union
           else f"keeps the {plan.described} of {views[index].name if index < len(views) else 'the tokenizer source'}")
        + "; each row is merged over the ingredients that have its token")


def _compare_configs(views: Sequence[Checkpoint], report: CompatibilityReport, taken: str) -> None:
    """One line per config field that differs, naming who has which value: an error for a field that means
    another architecture, else a note (the tensors' shapes decide)."""
    names = [v.name for v in views]
    # quantization_config (FP8, MXFP4): said once per checkpoint (`describe`), and the output drops it
    configs = [{k: x for k, x in v.config.items() if k != "quantization_config"} for v in views]
    for key, who in differing_fields(names, configs, skip=QUIET_KEYS):
        if key in report.config_keys:
            continue
        report.config_keys.append(key)
        if key.rsplit(".", 1)[-1] in ARCHITECTURE_KEYS:
            report.errors.append(f"config {key}: {who}")
        elif key not in report.config_said:
            report.notes.append(f"config {key}: {who}; the output takes {taken}'s")


def _compare_tensors(ref: Checkpoint, other: Checkpoint, report: CompatibilityReport) -> None:
    missing = sorted(set(ref.tensors) - set(other.tensors))
    extra = sorted(set(other.tensors) - set(ref.tensors))
    if missing:
        report.errors.append(f"{other.name} is missing tensor(s) {_listed(missing)} (present in {ref.name})")
    if extra:
        report.errors.append(f"{other.name} has extra tensor(s) {_listed(extra)} (absent from {ref.name})")
    for name in sorted(set(ref.tensors) & set(other.tensors)):
        a_info, b_info = ref.tensors[name], other.tensors[name]
        by_token = name in report.vocab_keys  # rows matched by token: only the other dims must agree
        if ((v := report.vocab).other_dims(name, a_info.shape) != v.other_dims(name, b_info.shape)) if by_token else (a_info.shape != b_info.shape):
            report.errors.append(
                f"tensor {name!r}: shape {list(a_info.shape)} in {ref.name}, {list(b_info.shape)} in {other.name}"
            )


def _compare_dtypes(views: Sequence[Checkpoint], report: CompatibilityReport, allow_dtype_mismatch: bool) -> None:
    """Tensors whose dtypes differ, one line per pattern of dtypes (who has which) with the tensors listed: a note
    when an output dtype was chosen, else an error."""
    names = [v.name for v in views]
    patterns: dict[tuple[str, ...], list[str]] = {}
    for name in sorted(set.intersection(*(set(v.tensors) for v in views))):
        dtypes = tuple(DTYPE_NAMES[v.tensors[name].dtype] for v in views)
        if len(set(dtypes)) > 1:
            patterns.setdefault(dtypes, []).append(name)
    for dtypes, tensors in patterns.items():
        floating = all(v.tensors[tensors[0]].dtype.is_floating_point for v in views)
        line = f"tensor(s) {_listed(tensors)}: dtype {who_has(names, dtypes)}"
        if floating and allow_dtype_mismatch:
            report.notes.append(line)
        else:
            report.errors.append(line + ("; choose the output dtype: dtype='float32' (or bfloat16, float16)" if floating else ""))


def _compare_pivot(ref: Checkpoint, pivot: Checkpoint, report: CompatibilityReport) -> None:
    """The pivot may lack tensors (a base without the fine-tunes' head): those start from the mean."""
    lacking = sorted(set(ref.tensors) - set(pivot.tensors))
    if lacking:
        report.notes.append(f"pivot {pivot.name} lacks tensor(s) {_listed(lacking)}: they start from the mean "
                            "of the ingredients")
    by_token = sorted(report.vocab_keys & set(pivot.tensors)) if report.vocab else []
    if by_token:
        report.notes.append(f"pivot {pivot.name}: its token-indexed rows ({', '.join(by_token)}) are not used; "
                            "each row starts from the mean of the ingredients that have its token")
    for name in sorted(set(ref.tensors) & set(pivot.tensors) - set(by_token)):
        if ref.tensors[name].shape != pivot.tensors[name].shape:
            report.errors.append(f"tensor {name!r}: shape {list(ref.tensors[name].shape)} in {ref.name}, "
                                 f"{list(pivot.tensors[name].shape)} in the pivot {pivot.name}")
    extra = sorted(set(pivot.tensors) - set(ref.tensors))
    if extra:
        report.notes.append(f"pivot {pivot.name} has tensor(s) {_listed(extra)} the ingredients lack: not used")
