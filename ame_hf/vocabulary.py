"""Tokenizers, chat templates and processors of the ingredients: which files they are, what they hold
(read as plain JSON/text, no code), how they differ, and which checkpoint the output takes them from."""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ._differences import MISSING, read_json, who_has

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
        vocab: token -> id of the base vocabulary (`tokenizer.json` model.vocab, a dict or Unigram's list of
            [piece, score], or `vocab.json`/`vocab.txt`).
        added: added tokens, token -> id (`tokenizer.json` added_tokens / `added_tokens.json`).
        special: special-token roles -> token (`tokenizer_config.json`, `special_tokens_map.json`).
        chat_template: the chat template text (`chat_template.jinja`, or tokenizer_config.json's).
    """

    files: tuple[str, ...] = ()
    vocab: dict[str, int] | None = None
    added: dict[str, int] = field(default_factory=dict)
    special: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    special_added: frozenset[str] = frozenset()  # added tokens marked special in tokenizer.json


def read_tokenizer(path: str | os.PathLike | None) -> TokenizerFiles:
    """Read a model directory's tokenizer files as data (never through code from the repo)."""
    if path is None or not Path(path).is_dir():
        return TokenizerFiles()
    root = Path(path)
    files = tuple(sorted(p.name for p in root.iterdir() if p.is_file() and is_tokenizer_file(p.name)))
    tok = read_json(root / "tokenizer.json", None) or {}
    model = tok.get("model") if isinstance(tok.get("model"), dict) else {}
    vocab = model.get("vocab") if isinstance(model.get("vocab"), dict) else None
    if isinstance(model.get("vocab"), list):  # Unigram (sentencepiece, T5): [piece, score] pairs, the id their index
        vocab = {entry[0]: i for i, entry in enumerate(model["vocab"]) if isinstance(entry, list) and entry}
    if vocab is None and isinstance(read_json(root / "vocab.json", None), dict):
        vocab = read_json(root / "vocab.json", None)
    if vocab is None and (root / "vocab.txt").is_file():
        lines = (root / "vocab.txt").read_text(encoding="utf-8", errors="replace").splitlines()
        vocab = {token: i for i, token in enumerate(lines)}
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", []) if isinstance(t, dict) and "content" in t}
    if not added and isinstance(read_json(root / "added_tokens.json", None), dict):
        added = dict(read_json(root / "added_tokens.json", None))
    config = read_json(root / "tokenizer_config.json", None) or {}
    special = {k: _token_text(v) for k, v in {**(read_json(root / "special_tokens_map.json", None) or {}), **config}.items()
               if k.endswith("_token") or k == "additional_special_tokens"}
    template = None
    if (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
    elif isinstance(read_json(root / "chat_template.json", None), dict):
        template = read_json(root / "chat_template.json", None).get("chat_template")
    elif isinstance(config.get("chat_template"), (str, list)):
        template = json.dumps(config["chat_template"]) if isinstance(config["chat_template"], list) else config["chat_template"]
    special_added = frozenset(t["content"] for t in tok.get("added_tokens", [])
                              if isinstance(t, dict) and t.get("special") and "content" in t)
    return TokenizerFiles(files=files, vocab=vocab, added=added, special=special, chat_template=template,
                          special_added=special_added)


def compare_tokenizers(names: Sequence[str], tokenizers: Sequence[TokenizerFiles]) -> list[str]:
    """One note per tokenizer file or field that differs, naming the file and the field and who has what (once,
    not once per pair of models)."""
    notes: list[str] = []
    files = [list(t.files) or MISSING for t in tokenizers]
    if any(f != files[0] for f in files):
        notes.append(f"tokenizer files: {who_has(names, files)}")
    vocabs = [t.vocab for t in tokenizers]
    if len({json.dumps(v, sort_keys=True) for v in vocabs if v is not None}) > 1:
        first = next(v for v in vocabs if v is not None)
        notes.append("vocabulary (tokenizer.json model.vocab): " + who_has(names, vocabs, lambda v: "none" if v is None
                     else f"{len(v)} tokens" + ("" if v == first else f", {sum(v.get(t) != i for t, i in first.items())}"
                                                f" of the first's with another id or absent")))
    for token in sorted(set().union(*(t.added for t in tokenizers))):
        ids = [t.added.get(token, MISSING) for t in tokenizers]
        if any(i != ids[0] for i in ids):
            notes.append(f"added token {token!r} (tokenizer.json added_tokens), its id: {who_has(names, ids)}")
    for role in sorted(set().union(*(t.special for t in tokenizers))):
        values = [t.special.get(role) for t in tokenizers]
        if any(v != values[0] for v in values):
            notes.append(f"special token {role} (tokenizer_config.json): {who_has(names, values)}")
    templates = [t.chat_template for t in tokenizers]
    if any(t != templates[0] for t in templates):
        have = [n for n, t in zip(names, templates) if t]
        distinct = list(dict.fromkeys(t for t in templates if t))
        notes.append("chat template (chat_template.jinja / tokenizer_config.json) " + (
            f"only in {', '.join(have)}" + (" (and differs between them)" if len(distinct) > 1 else "")
            if len(have) < len(names) else
            "differs: " + who_has(names, templates, lambda t: f"template {distinct.index(t) + 1}")))
    return notes


def _token_text(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_token_text(v) for v in value]
    return value


def token_ids(tokenizer: TokenizerFiles) -> dict[str, int] | None:
    """Every token of a tokenizer (base vocabulary and added tokens) -> its id; None without a tokenizer."""
    if tokenizer.vocab is None and not tokenizer.added:
        return None
    return {**(tokenizer.vocab or {}), **tokenizer.added}


@dataclass(frozen=True, kw_only=True)
class VocabularyPlan:
    """How the rows of token-indexed tensors are matched across ingredients (by token string).

    Attributes:
        size: rows of the output's token-indexed tensors (its `vocab_size`).
        rows: per ingredient, output row -> that ingredient's row, or -1 where it lacks the token.
        new_tokens: tokens the output has beyond the source tokenizer, in order (`union`), with
            whether each is special.
        source: the ingredient whose tokenizer (and ids) the output keeps.
        tokenizer: the tokenizer of another checkpoint whose vocabulary the output keeps, if any.
        first_new: the row of the first new token (padding rows may follow the new tokens); None: the last
            `len(new_tokens)` rows.
        padding: how many output rows are padding (no token), matched by position.
        columns: token-indexed tensors whose tokens run along the last dimension, every other of size 1
            (BART's `final_logits_bias`, [1, vocab]).
    """

    size: int
    rows: list[list[int]]
    new_tokens: list[tuple[str, bool]]
    source: int
    tokenizer: TokenizerFiles | None = None
    first_new: int | None = None
    padding: int = 0
    columns: frozenset[str] = frozenset()

    def other_dims(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A token-indexed tensor's shape without its token dimension (the last for `columns`, else the first)."""
        return tuple(shape[:-1]) if name in self.columns else tuple(shape[1:])

    def shape_of(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output shape of a token-indexed tensor of this `shape`."""
        return (*shape[:-1], self.size) if name in self.columns else (self.size, *shape[1:])

    @property
    def described(self) -> str:
        """`N tokens`, and the padding rows beside them if any."""
        return f"{self.size - self.padding} tokens" + (f" and {self.padding} padding rows" if self.padding else "")

    def groups(self) -> list[tuple[tuple[int, ...], list[int]]]:
        """Output rows grouped by the ingredients that own them: [(owners, output rows)], owners in order."""
        by_owners: dict[tuple[int, ...], list[int]] = {}
        for row in range(self.size):
            owners = tuple(i for i, rows in enumerate(self.rows) if rows[row] >= 0)
            by_owners.setdefault(owners, []).append(row)
        return sorted(by_owners.items(), key=lambda kv: kv[1][0])


def plan_vocabulary(names: Sequence[str], tokenizers: Sequence[TokenizerFiles], row_counts: Sequence[int], *,
                    source: int, union: bool, columns: frozenset[str] = frozenset()) -> VocabularyPlan:
    """Match token-indexed rows by token string.

    A row beyond a tokenizer's tokens (padding, as Qwen and T5 pad their embeddings) is matched by its index
    among the ingredients that have it as padding. With `union`, the source's rows keep their ids up to its last
    token, every token another ingredient has follows in ingredient order (the ids the source tokenizer gives
    tokens added to it), then padding rows up to the largest row count; else the output has exactly the source's
    rows.

    Raises:
        ValueError: an ingredient has no tokenizer (its rows cannot be mapped), naming it; or a padding row of
            the output that no ingredient has as padding.
    """
    maps = []
    for name, tok, count in zip(names, tokenizers, row_counts):
        ids = token_ids(tok)
        if ids is None:
            raise ValueError(f"{name} has no tokenizer, and the vocabularies differ: its embedding rows cannot be "
                             "matched by token; add its tokenizer files, or merge ingredients of one vocabulary")
        by_row: dict[int, object] = {i: t for t, i in ids.items() if 0 <= i < count}
        maps.append({by_row.get(r, ("#row", r)): r for r in range(count)})
    keys = sorted(maps[source], key=maps[source].get)
    new_tokens: list[tuple[str, bool]] = []
    first_new = None
    if union:
        last = max((r for k, r in maps[source].items() if isinstance(k, str)), default=-1)
        keys = keys[:last + 1]
        first_new = len(keys)
        seen = set(keys)
        for i, m in enumerate(maps):
            for key in sorted(m, key=m.get):
                if key not in seen and isinstance(key, str):
                    seen.add(key)
                    keys.append(key)
                    new_tokens.append((key, key in _specials(tokenizers[i])))
        keys += [("#row", r) for r in range(len(keys), max(len(keys), *row_counts))]
        orphan = next((k for k in keys if isinstance(k, tuple) and all(k not in m for m in maps)), None)
        if orphan is not None:
            raise ValueError(f"row {orphan[1]} of the padded union is padding in no ingredient (the tokens of "
                             f"{', '.join(n for n, c in zip(names, row_counts) if c > orphan[1])} reach past it); "
                             "choose tokenizer_source=INDEX of one ingredient")
    rows = [[m.get(k, -1) for k in keys] for m in maps]
    return VocabularyPlan(size=len(keys), rows=rows, new_tokens=new_tokens, source=source, first_new=first_new,
                          padding=sum(isinstance(k, tuple) for k in keys), columns=columns)


def _specials(tokenizer: TokenizerFiles) -> set[str]:
    out: set[str] = set()
    for value in tokenizer.special.values():
        out.update(value if isinstance(value, list) else [value])
    return out | set(tokenizer.special_added)


def tokens_past_rows(tokenizer: TokenizerFiles, rows: int, plan: VocabularyPlan | None = None) -> dict[str, int]:
    """The tokens `tokenizer` gives an id at or past `rows` (the embedding rows it is used with): tokens added to a
    tokenizer without `resize_token_embeddings`, which no row embeds. A union's new token at the id its row has
    (`plan`: another ingredient's, placed there) is not one.

    Args:
        tokenizer: the tokenizer the output would take.
        rows: the embedding rows of its model.
        plan: the vocabulary plan, when the output adds a union's new tokens to it.

    Returns:
        token -> id, in id order (empty when every token has its row).

    >>> tokens_past_rows(TokenizerFiles(vocab={"a": 0, "b": 1}, added={"<x>": 2}), 2)
    {'<x>': 2}
    """
    placed: dict[str, int] = {}
    if plan is not None and plan.new_tokens:
        start = plan.size - len(plan.new_tokens) if plan.first_new is None else plan.first_new
        placed = {token: start + j for j, (token, _) in enumerate(plan.new_tokens)}
    ids = sorted((token_ids(tokenizer) or {}).items(), key=lambda kv: kv[1])
    return {token: i for token, i in ids if i >= rows and placed.get(token) != i}


def past_rows_line(tokenizer: str, past: dict[str, int], rows: int) -> str:
    """The one-line refusal of a `tokenizer` (`the tokenizer of NAME`) whose tokens `past` reach past its model's
    `rows` embedding rows."""
    shown = ", ".join(f"{t!r} id {i}" for t, i in list(past.items())[:5]) + (" ..." if len(past) > 5 else "")
    return (f"{tokenizer} gives {shown}, past the {rows} embedding rows (tokens added without "
            "resize_token_embeddings): the output could not embed them; choose tokenizer_source=INDEX of an ingredient "
            "whose tokenizer fits its rows, or resize that model to its tokenizer "
            "(model.resize_token_embeddings(len(tokenizer))) and save it again")
