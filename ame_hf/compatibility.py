"""Compatibility report: can these checkpoints be merged, and if not, every reason why.

Reads only configs, tensor names/shapes/dtypes (a safetensors header is enough) and tokenizer files.
Reconciles the layouts transformers reconciles on load (`reconcile`); tensor shapes decide errors,
other config differences are notes; quantized weights and remote-code architectures are refused.
`merge` runs the same check first and refuses with the same report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .checkpoint import DTYPE_NAMES, Checkpoint
from .reconcile import Layout, Renaming, UnknownArchitecture, model_layout, rename
from .vocabulary import (TokenizerFiles, VocabularyPlan, compare_tokenizers, plan_vocabulary, read_tokenizer,
                         token_ids)

# Config keys whose difference means another architecture: errors. Any other difference is a note,
# since the tensors' shapes (compared one by one) decide whether weights can be averaged.
ARCHITECTURE_KEYS = ("model_type",)
# Config keys that say nothing about the model (bookkeeping): differences are not even notes.
QUIET_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype"}
_MAX_LISTED = 20


@dataclass
class CompatibilityReport:
    """The outcome of `check_compatibility`: `errors` block a merge, `notes` do not."""

    names: list[str]
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # What the merge then uses: every ingredient (and the pivot) seen under the output's tensor names,
    # and which ingredient's config and layout the output takes.
    checkpoints: list[Checkpoint] = field(default_factory=list, repr=False, compare=False)
    pivot: Checkpoint | None = field(default=None, repr=False, compare=False)
    source: int = 0
    config_keys: list[str] = field(default_factory=list)  # config keys that differ (said with the errors)
    # When vocabularies differ: how token-indexed rows are matched, and which tensors are token-indexed.
    vocab: VocabularyPlan | None = field(default=None, repr=False, compare=False)
    vocab_keys: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        """One line: the verdict and the first problem."""
        if self.ok:
            return f"compatible: {len(self.names)} checkpoints can be merged" + (
                f" ({len(self.notes)} note(s))" if self.notes else "")
        more = f" (and {len(self.errors) - 1} more difference(s); run `ame-hf check` for all)" if len(self.errors) > 1 else ""
        keys = f"; their configs differ in {', '.join(self.config_keys[:6])}" if self.config_keys else ""
        return f"incompatible checkpoints: {self.errors[0]}{more}{keys}"

    def format(self) -> str:
        """The full report, one finding a line."""
        lines = [("OK  " if self.ok else "FAIL ") + self.summary()]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  note:  {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checkpoints": self.names, "errors": self.errors, "notes": self.notes}


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    # Nested sub-configs (text_config, vision_config) are compared key by key.
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key.endswith("_config"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
    report.checkpoints, report.pivot = views, pivot_view
    if tokenizers is None:  # read once: the vocabulary plan and the notes
        tokenizers = [read_tokenizer(c.path) for c in everything]
    _vocabulary(views, tokenizers[:len(views)], report, tokenizer_source)
    _compare_configs([*views, *([pivot_view] if pivot_view else [])], report)
    ref = views[0]
    for other in views[1:]:
        _compare_tensors(ref, other, report, allow_dtype_mismatch)
    if pivot_view is not None:
        _compare_pivot(ref, pivot_view, report)
    report.notes += compare_tokenizers([c.name for c in everything], tokenizers)
    return report


def _refusals(ckpt: Checkpoint) -> list[str]:
    """Quantized weights, architectures only the repo's own code defines, and what an adapter's tensors cannot make
    equal to peft's merge (`AdapterCheckpoint.refusals`): refused, one line each."""
    out = config_refusals(ckpt.name, ckpt.config)
    if ckpt.unsupported and not out:
        dtypes = ", ".join(sorted(set(ckpt.unsupported.values())))
        out.append(f"{ckpt.name} holds {dtypes} tensors (quantized or FP8); {_QUANTIZED_HINT}")
    return out + list(getattr(ckpt, "refusals", ()))


_QUANTIZED_HINT = ("AME averages full-precision weights: merge the unquantized originals (e.g. the fine-tune's "
                   "float16/bfloat16 release), then quantize the merge")


def config_refusals(name: str, config: dict[str, Any]) -> list[str]:
    """What `config.json` alone refuses (so nothing else need be read): quantized weights, and an
    architecture only the repo's own code defines."""
    out = []
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        method = quant.get("quant_method") or quant.get("quant_type") or "an unnamed method"
        out.append(f"{name} is quantized with {method} (quantization_config); {_QUANTIZED_HINT}")
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
    layout (and config) the output takes: the one that explains every ingredient's tensors best."""
    names = [frozenset(c.tensors) for c in checkpoints]
    archs = [tuple(c.config.get("architectures") or ()) for c in checkpoints]
    # A config without `architectures` (some older saves) takes those of an ingredient of its model type.
    known = {c.config.get("model_type"): a for c, a in zip(checkpoints, archs) if a}
    archs = [a or known.get(c.config.get("model_type"), ()) for c, a in zip(checkpoints, archs)]
    same = len(set(names)) == 1 and len(set(archs)) == 1 and (pivot is None or frozenset(pivot.tensors) == names[0])
    if same or not all(archs):
        return checkpoints, pivot, 0  # nothing to reconcile (or nothing to reconcile it with)
    layouts: dict[tuple[str, ...], Layout] = {}
    for i, ckpt in enumerate(checkpoints):
        try:
            layouts.setdefault(archs[i], model_layout({**ckpt.config, "architectures": list(archs[i])}))
        except Exception as err:  # noqa: BLE001  transformers cannot build it: compare names as stored
            report.notes.append(f"{ckpt.name}: cannot build {archs[i][0]} to reconcile its layout ({err}); "
                                "tensor names are compared as stored")
            return checkpoints, pivot, 0
    cost = {a: sum(len(r.unexpected) + len(r.missing) for r in (rename(c.tensors, layout) for c in checkpoints))
            for a, layout in layouts.items()}
    # Fewest names left unexplained; on a tie the richer class (a head over its bare base model).
    source = min(range(len(checkpoints)), key=lambda i: (
        cost[archs[i]], -len(layouts[archs[i]].keys | set(layouts[archs[i]].tied)), i))
    layout = layouts[archs[source]]
    views = [_view(c, rename(c.tensors, layout), layout, report, unexpected_ok=False) for c in checkpoints]
    pivot_view = _view(pivot, rename(pivot.tensors, layout), layout, report, unexpected_ok=True) if pivot else None
    return views, pivot_view, source


def _view(ckpt: Checkpoint, renaming: Renaming, layout: Layout, report: CompatibilityReport, *,
          unexpected_ok: bool) -> Checkpoint:
    """`ckpt` under the layout's names; what was reconciled becomes a note."""
    if renaming.is_identity and not renaming.unexpected:
        return ckpt
    moved = [s for n, s in renaming.names.items() if n != s]
    if moved:
        report.notes.append(f"{ckpt.name}: {len(moved)} tensor name(s) taken with/without the base-model prefix "
                            f"{layout.prefix!r} (as {layout.architecture} stores them), e.g. {moved[0]!r}")
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
    sizes = [c.config.get("vocab_size") for c in views]
    maps = [token_ids(t) for t in tokenizers]
    if len(set(sizes)) <= 1 and all(m == maps[0] for m in maps):
        return
    try:
        layout = model_layout(views[0].config)
    except Exception as err:  # noqa: BLE001  no class to say which tensors are token-indexed
        report.errors.append(f"the vocabularies differ (vocab_size {sizes}) and {views[0].name}'s architecture "
                             f"cannot be built to find its token-indexed tensors ({err})")
        return
    keys = frozenset(k for k in layout.vocab_keys if all(k in c.tensors for c in views))
    if not keys:
        return
    name = sorted(keys)[0]
    counts = [c.tensors[name].shape[0] for c in views]
    union = source in ("auto", "union")
    names = [c.name for c in views]
    index: int | None = 0 if union or source in ("first", "pivot") else source if isinstance(source, int) else None
    if index is None:  # another checkpoint's tokenizer: its vocabulary exactly, every row from the ingredients
        if not isinstance(source, TokenizerFiles) or token_ids(source) is None:
            report.errors.append(f"the vocabularies differ and --tokenizer-source {source!r} holds no tokenizer")
            return
        names, tokenizers = [*names, "the tokenizer source"], [*tokenizers, source]
        counts, index = [*counts, len(token_ids(source) or {})], len(views)
    try:
        plan = plan_vocabulary(names, tokenizers, counts, source=index, union=union)
    except ValueError as err:
        report.errors.append(str(err))
        return
    if index == len(views):  # drop the tokenizer-only source: every row must come from an ingredient
        orphans = [r for r in range(plan.size) if all(rows[r] < 0 for rows in plan.rows[:-1])]
        if orphans:
            report.errors.append(f"--tokenizer-source has {len(orphans)} token(s) no ingredient has; choose "
                                 "union, first or an ingredient index")
            return
        plan = VocabularyPlan(size=plan.size, rows=plan.rows[:-1], new_tokens=[], source=0, union=False,
                              tokenizer=source)
    report.vocab, report.vocab_keys = plan, keys
    added = ", ".join(repr(t) for t, _ in plan.new_tokens[:8]) + (" ..." if len(plan.new_tokens) > 8 else "")
    report.notes.append(
        f"the vocabularies differ (rows {counts}): rows of {', '.join(sorted(keys))} are matched by token; the output "
        + (f"has the union of {plan.size} tokens ({len(plan.new_tokens)} new: {added})" if union
           else f"keeps the {plan.size} tokens of {views[index].name if index < len(views) else 'the tokenizer source'}")
        + "; each row is merged over the ingredients that have its token")


def _compare_configs(views: Sequence[Checkpoint], report: CompatibilityReport) -> None:
    ref = views[0]
    ref_config = _flatten(ref.config)
    for other in views[1:]:
        config = _flatten(other.config)
        for key in sorted(set(ref_config) | set(config)):
            a, b = ref_config.get(key, "<missing>"), config.get(key, "<missing>")
            leaf = key.rsplit(".", 1)[-1]
            if a == b or leaf in QUIET_KEYS:
                continue
            line = f"config {key}: {ref.name} has {a!r}, {other.name} has {b!r}"
            if key not in report.config_keys:
                report.config_keys.append(key)
            (report.errors if leaf in ARCHITECTURE_KEYS else report.notes).append(line)


def _compare_tensors(ref: Checkpoint, other: Checkpoint, report: CompatibilityReport,
                     allow_dtype_mismatch: bool) -> None:
    missing = sorted(set(ref.tensors) - set(other.tensors))
    extra = sorted(set(other.tensors) - set(ref.tensors))
    if missing:
        report.errors.append(f"{other.name} is missing tensor(s) {_listed(missing)} (present in {ref.name})")
    if extra:
        report.errors.append(f"{other.name} has extra tensor(s) {_listed(extra)} (absent from {ref.name})")
    for name in sorted(set(ref.tensors) & set(other.tensors)):
        a_info, b_info = ref.tensors[name], other.tensors[name]
        by_token = name in report.vocab_keys  # rows matched by token: only the other dims must agree
        if (a_info.shape[1:] != b_info.shape[1:]) if by_token else (a_info.shape != b_info.shape):
            report.errors.append(
                f"tensor {name!r}: shape {list(a_info.shape)} in {ref.name}, {list(b_info.shape)} in {other.name}"
            )
        elif a_info.dtype != b_info.dtype:
            floating = a_info.dtype.is_floating_point and b_info.dtype.is_floating_point
            line = (f"tensor {name!r}: dtype {DTYPE_NAMES[a_info.dtype]} in {ref.name}, "
                    f"{DTYPE_NAMES[b_info.dtype]} in {other.name}")
            if floating and allow_dtype_mismatch:
                report.notes.append(line)
            else:
                report.errors.append(line + ("; choose the output dtype with --dtype" if floating else ""))


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
