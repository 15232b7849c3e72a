"""Score causal language models on local text: the mean per-token negative log-likelihood (and its
perplexity), from transformers' own loss over batches of documents. Works offline."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._quiet import quiet_libraries
from .errors import CheckpointError, InvalidConfigError

logger = logging.getLogger(__name__)

# Tokens a document may have when neither --max-length nor the model says (a fallback only).
FALLBACK_MAX_LENGTH = 1024


@dataclass(frozen=True)
class TextData:
    """Documents for language modelling: `texts`, one document each."""

    name: str
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def load_texts(path: str | os.PathLike) -> TextData:
    """Read documents from a `.txt` file (one per non-empty line) or JSONL (a `text` field per row).

    Args:
        path: the data file.

    Returns:
        A `TextData` named after the file's stem.

    Raises:
        InvalidConfigError: the file is missing, unreadable, empty or lacks `text` fields.

    >>> load_texts("val.txt").texts[:1]  # doctest: +SKIP
    ['the first document']
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidConfigError(f"data={str(path)!r} does not exist (text-generation needs a .txt or JSONL file)",
                                 field="data")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix == ".txt":
            texts = lines
        else:
            rows = [json.loads(line) for line in lines]
            if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
                raise InvalidConfigError(f"data={str(path)!r}: every row needs a `text` field (a string)", field="data")
            texts = [r["text"] for r in rows]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidConfigError(f"data={str(path)!r} cannot be read as {'text' if path.suffix == '.txt' else 'JSONL'}: "
                                 f"{err}", field="data") from err
    if not texts:
        raise InvalidConfigError(f"data={str(path)!r} holds no documents", field="data")
    return TextData(path.stem, texts)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def check_tokenizer(ref: str | os.PathLike) -> None:
    """Refuse a local model folder without tokenizer files (scoring text needs it) before any merge.

    Hub references are let through: their files are only known once fetched.

    Raises:
        InvalidConfigError: a local folder with none of `TOKENIZER_FILES`.
    """
    path = Path(ref)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InvalidConfigError(f"{ref} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): text-generation "
                                 "scores text, which needs the model's tokenizer")


def model_max_length(config: Any, tokenizer: Any) -> int:
    """The longest input the model takes: its position limit, else the tokenizer's, else a fallback."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**9 else FALLBACK_MAX_LENGTH


def _load(model: Any, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if isinstance(model, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(str(model))
            model = AutoModelForCausalLM.from_pretrained(str(model))
        else:
            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    except Exception as err:
        raise CheckpointError(f"cannot load {model} as a causal language model with its tokenizer "
                              f"({type(err).__name__}: {err})") from err
    return model.to(device).eval(), tokenizer


def mean_token_nll(model: Any, data: TextData, *, max_length: int | None = None, batch_size: int = 8,
                   device: str | None = None, progress: bool = False,
                   per_document: list[tuple[float, int]] | None = None) -> tuple[float, int]:
    """The mean negative log-likelihood per predicted token (nats) of a causal LM over all documents.

    Each batch goes through the model's forward with `labels` (transformers shifts them and masks
    padding given as -100); its mean loss times its number of predicted tokens is summed, so the result
    is the token-weighted mean over the whole data set, whatever the batching and padding.
    `evaluate`'s `perplexity` metric is not used: it loads the model by Hub id and its script is itself
    fetched from the Hub, and it averages per-document perplexities rather than per-token losses.

    Args:
        model: a model directory, or a loaded transformers causal LM.
        data: the documents.
        max_length: truncate each document to this many tokens (default: the model's position limit).
        batch_size: documents per forward pass.
        device: `cpu`, `cuda`, ... (default: CUDA when available, else the CPU).
        progress: show a tqdm bar over the batches; False also keeps transformers quiet while the model
            loads and runs (`quiet_libraries`).
        per_document: a list that receives `(summed NLL, predicted tokens)` of every document, in the order of
            `data.texts`, from the same forward passes (for `guard`'s paired comparison; the mean is unchanged).

    Returns:
        (mean NLL per token, number of predicted tokens).

    Raises:
        InvalidConfigError: no document has two tokens after truncation (nothing to predict).

    >>> mean_token_nll("merged", load_texts("val.txt"), max_length=128)  # doctest: +SKIP
    (2.31, 40960)
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with quiet_libraries(not progress):
        return _mean_token_nll(model, data, limit=max_length, batch_size=batch_size, device=device,
                               progress=progress, per_document=per_document)


def _mean_token_nll(model: Any, data: TextData, *, limit: int | None, batch_size: int, device: str,
                    progress: bool, per_document: list[tuple[float, int]] | None) -> tuple[float, int]:
    import torch
    from tqdm.auto import tqdm

    model, tokenizer = _load(model, device)
    limit = limit or model_max_length(model.config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = [tokenizer(t, truncation=True, max_length=limit)["input_ids"][:limit] for t in data.texts]
    # Longest first: batches of similar length waste less compute on padding (a stable order: ties as given).
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    each = [(0.0, 0)] * len(encoded)  # per document, in the order of `data.texts`
    total, count = 0.0, 0
    batches = range(0, len(order), batch_size)
    with torch.no_grad():
        for start in tqdm(batches, desc=f"scoring {data.name}", unit="batch", disable=not progress, leave=False):
            rows = [i for i in order[start:start + batch_size] if len(encoded[i]) >= 2]
            docs = [encoded[i] for i in rows]
            if not docs:
                continue
            width = max(len(d) for d in docs)
            ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(docs), width), dtype=torch.long)
            for row, doc in enumerate(docs):
                ids[row, :len(doc)] = torch.tensor(doc)
                mask[row, :len(doc)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            predicted = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * predicted
            count += predicted
            if per_document is not None:
                nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().transpose(1, 2),
                                                        labels[:, 1:].to(out.logits.device), reduction="none")
                for row, i in enumerate(rows):
                    each[i] = (float(nll[row].sum()), len(docs[row]) - 1)
    if count == 0:
        raise InvalidConfigError(f"data={data.name!r}: no document has 2 tokens or more after truncation "
                                 "to score; give longer documents or a larger max_length=N", fields=("data", "max_length"))
    if per_document is not None:
        per_document.extend(each)
    return total / count, count


def perplexity(loss: float) -> float:
    """exp(mean NLL per token): the perplexity reported beside the loss.

    >>> round(perplexity(0.0), 3)
    1.0
    """
    return math.exp(min(loss, 700.0))
