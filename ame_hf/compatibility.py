"""Compatibility report: can these checkpoints be merged, and if not, every reason why.

Compares configs (shape-defining fields are errors, names and labels are notes), tensor names,
shapes and dtypes. `merge` runs the same check first and refuses with the same report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from .checkpoint import DTYPE_NAMES, Checkpoint

# Config keys that never change the weights' layout: differences are only notes.
NOTE_KEYS = {
    "_name_or_path", "name_or_path", "transformers_version", "id2label", "label2id", "torch_dtype",
    "dtype", "finetuning_task", "problem_type", "task_specific_params", "_commit_hash", "auto_map",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "tie_word_embeddings",
}
# Config keys that decide shapes or the architecture: differences are errors.
_SHAPE_KEY = re.compile(
    r"(^model_type$|^architectures$|size|^n_|^num_|layers|heads|_dim$|^dim$|^d_|vocab|experts|"
    r"^max_position_embeddings$|^n_positions$|^type_vocab_size$|^patch|^image_size$|^num_channels$)"
)
_MAX_LISTED = 20


@dataclass
class CompatibilityReport:
    """The outcome of `check_compatibility`: `errors` block a merge, `notes` do not."""

    names: list[str]
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        """One line: the verdict and the first problem."""
        if self.ok:
            return f"compatible: {len(self.names)} checkpoints can be merged" + (
                f" ({len(self.notes)} note(s))" if self.notes else "")
        more = f" (and {len(self.errors) - 1} more difference(s); run `ame-hf check` for all)" if len(self.errors) > 1 else ""
        return f"incompatible checkpoints: {self.errors[0]}{more}"

    def format(self) -> str:
        """The full report, one finding a line."""
        lines = [("OK  " if self.ok else "FAIL ") + self.summary()]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  note:  {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checkpoints": self.names, "errors": self.errors, "notes": self.notes}


def is_shape_key(key: str) -> bool:
    return key not in NOTE_KEYS and bool(_SHAPE_KEY.search(key))


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
    allow_dtype_mismatch: bool = False,
) -> CompatibilityReport:
    """Compare every checkpoint with the first one.

    Args:
        checkpoints: the ingredients (and the pivot checkpoint, if any).
        allow_dtype_mismatch: dtype differences become notes (an explicit output dtype was chosen).

    >>> report = check_compatibility([Checkpoint("a"), Checkpoint("b")])  # doctest: +SKIP
    >>> print(report.format())                                            # doctest: +SKIP
    """
    report = CompatibilityReport(names=[c.name for c in checkpoints])
    if not checkpoints:
        report.errors.append("no checkpoints given")
        return report
    ref = checkpoints[0]
    ref_config = _flatten(ref.config)
    for other in checkpoints[1:]:
        config = _flatten(other.config)
        for key in sorted(set(ref_config) | set(config)):
            a, b = ref_config.get(key, "<missing>"), config.get(key, "<missing>")
            if a == b:
                continue
            line = f"config {key}: {ref.name} has {a!r}, {other.name} has {b!r}"
            leaf = key.rsplit(".", 1)[-1]
            (report.errors if is_shape_key(leaf) else report.notes).append(line)
        missing = sorted(set(ref.tensors) - set(other.tensors))
        extra = sorted(set(other.tensors) - set(ref.tensors))
        if missing:
            report.errors.append(f"{other.name} is missing tensor(s) {_listed(missing)} (present in {ref.name})")
        if extra:
            report.errors.append(f"{other.name} has extra tensor(s) {_listed(extra)} (absent from {ref.name})")
        for name in sorted(set(ref.tensors) & set(other.tensors)):
            a_info, b_info = ref.tensors[name], other.tensors[name]
            if a_info.shape != b_info.shape:
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
    return report
