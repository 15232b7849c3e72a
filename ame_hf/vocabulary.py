"""Tokenizers, chat templates and processors of the ingredients: which files they are, what they hold
(read as plain JSON/text, no code), how they differ, and which checkpoint the output takes them from."""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

# Files that belong to the tokenizer, the chat template or the processor (image, audio, video):
# they come from `--tokenizer-source`; every other side file comes from the model the config comes from.
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.*",
    "merges.txt", "*.model", "*.spm", "spiece.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "image_processor*", "feature_extractor*",
    "video_preprocessor_config.json", "normalizer.json",
)


def is_tokenizer_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in TOKENIZER_PATTERNS)


@dataclass(frozen=True, kw_only=True)
class TokenizerFiles:
    """What one model's tokenizer files say (None where the file is absent).

    Attributes:
        files: the tokenizer/processor file names present.
        vocab: token -> id of the base vocabulary (`tokenizer.json` model.vocab, or `vocab.json`/`vocab.txt`).
        added: added tokens, token -> id (`tokenizer.json` added_tokens / `added_tokens.json`).
        special: special-token roles -> token (`tokenizer_config.json`, `special_tokens_map.json`).
        chat_template: the chat template text (`chat_template.jinja`, or tokenizer_config.json's).
    """

    files: tuple[str, ...] = ()
    vocab: dict[str, int] | None = None
    added: dict[str, int] = field(default_factory=dict)
    special: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None


def read_tokenizer(path: str | os.PathLike | None) -> TokenizerFiles:
    """Read a model directory's tokenizer files as data (never through code from the repo)."""
    if path is None or not Path(path).is_dir():
        return TokenizerFiles()
    root = Path(path)
    files = tuple(sorted(p.name for p in root.iterdir() if p.is_file() and is_tokenizer_file(p.name)))
    tok = _json(root / "tokenizer.json") or {}
    model = tok.get("model") if isinstance(tok.get("model"), dict) else {}
    vocab = model.get("vocab") if isinstance(model.get("vocab"), dict) else None
    if vocab is None and isinstance(_json(root / "vocab.json"), dict):
        vocab = _json(root / "vocab.json")
    if vocab is None and (root / "vocab.txt").is_file():
        lines = (root / "vocab.txt").read_text(encoding="utf-8", errors="replace").splitlines()
        vocab = {token: i for i, token in enumerate(lines)}
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", []) if isinstance(t, dict) and "content" in t}
    if not added and isinstance(_json(root / "added_tokens.json"), dict):
        added = dict(_json(root / "added_tokens.json"))
    config = _json(root / "tokenizer_config.json") or {}
    special = {k: _token_text(v) for k, v in {**(_json(root / "special_tokens_map.json") or {}), **config}.items()
               if k.endswith("_token") or k == "additional_special_tokens"}
    template = None
    if (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
    elif isinstance(_json(root / "chat_template.json"), dict):
        template = _json(root / "chat_template.json").get("chat_template")
    elif isinstance(config.get("chat_template"), (str, list)):
        template = json.dumps(config["chat_template"]) if isinstance(config["chat_template"], list) else config["chat_template"]
    return TokenizerFiles(files=files, vocab=vocab, added=added, special=special, chat_template=template)


def compare_tokenizers(names: Sequence[str], tokenizers: Sequence[TokenizerFiles]) -> list[str]:
    """One note per difference from the first model's tokenizer, naming the file and the field."""
    notes: list[str] = []
    first_name, first = names[0], tokenizers[0]
    for name, other in zip(names[1:], tokenizers[1:]):
        if first.files != other.files:
            notes.append(f"tokenizer files: {first_name} has {list(first.files) or 'none'}, "
                         f"{name} has {list(other.files) or 'none'}")
        if first.vocab is not None and other.vocab is not None and first.vocab != other.vocab:
            moved = sum(1 for t, i in first.vocab.items() if other.vocab.get(t) != i)
            notes.append(f"vocabulary (tokenizer.json model.vocab): {moved} of {len(first.vocab)} tokens of "
                         f"{first_name} have another id or are absent in {name}")
        for token in sorted(set(first.added) ^ set(other.added)):
            owner = name if token in other.added else first_name
            notes.append(f"added token {token!r} (tokenizer.json added_tokens) only in {owner}")
        for token in sorted(set(first.added) & set(other.added)):
            if first.added[token] != other.added[token]:
                notes.append(f"added token {token!r} has id {first.added[token]} in {first_name}, "
                             f"{other.added[token]} in {name}")
        for role in sorted(set(first.special) | set(other.special)):
            if first.special.get(role) != other.special.get(role):
                notes.append(f"special token {role} (tokenizer_config.json): {first_name} has "
                             f"{first.special.get(role)!r}, {name} has {other.special.get(role)!r}")
        if first.chat_template != other.chat_template:
            what = "differs" if first.chat_template and other.chat_template else (
                f"only in {first_name if first.chat_template else name}")
            notes.append(f"chat template (chat_template.jinja / tokenizer_config.json) {what} "
                         f"between {first_name} and {name}")
    return notes


def _json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _token_text(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_token_text(v) for v in value]
    return value
