"""The input stage of every run (`merge`, `check`, `evaluate`, `tune`, the greedy soup, the Space): each reference
resolved once (one `model_info` per Hub repo and revision), its light files fetched once, each config, adapter
config, tokenizer and safetensors header parsed once; the compatibility report built once from those, before any
weight is downloaded; then the weights fetched (size announced, disk checked) and the checked views upgraded."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ._model_files import read_config
from ._adapter_config import adapter_base, adapter_refusals, is_adapter_dir, read_adapter_config
from .adapters import ADAPTER_FILES, AdapterCheckpoint
from .checked_inputs import Entry, Inputs
from .checkpoint import Checkpoint
from .compatibility import CompatibilityReport, check_compatibility, config_refusals
from .config import PIVOT_WORDS, SOURCE_WORDS
from .errors import CheckpointError
from .fetch import check_disk_space, download_size, fetch_light, fetch_weights, format_size, header_checkpoint, hub_cache
from .modules import check_modules, module_checkpoint, module_config
from .records import HubSource, Ingredient
from .resolve import local_inputs, plan_refs, split_ref
from .vocabulary import TokenizerFiles, read_tokenizer

logger = logging.getLogger(__name__)


class InputStage:
    """Every input of one run, each read once: the stage caches what it resolved, fetched and parsed, so the
    check, the download, the merge, the finish and the card (and every merge of a `tune`) share it.

    Args:
        token: Hub token for private or gated repos.
        variant: the weights variant to read (`model.NAME.safetensors`).

    >>> stage = InputStage()                                        # doctest: +SKIP
    >>> inputs = stage.check(["org/a", "org/b"])                     # doctest: +SKIP
    >>> inputs.report.ok, inputs.open().checkpoints                  # doctest: +SKIP
    """

    def __init__(self, *, token: str | None = None, variant: str | None = None) -> None:
        self.token, self.variant = token, variant
        self._sources: dict[tuple[str, str | None], Ingredient | HubSource] = {}
        self._lights: dict[tuple[str, str | None], Ingredient] = {}
        self._entries: dict[str, Entry] = {}
        # Keyed by folder: `./a` and `a`, or `org/a` and `org/a@<its sha>`, are one model, read once.
        self._configs: dict[Path, dict[str, Any]] = {}
        self._tokenizers: dict[Path, TokenizerFiles] = {}
        self._checked: dict[tuple[Path, bool, int, str], Checkpoint] = {}
        self._opened: dict[int, Checkpoint] = {}
        self._fetched: set[Path] = set()  # Hub snapshots whose weights are downloaded
        self._entry_of: dict[int, tuple[Entry, str]] = {}  # a checkpoint known from headers -> its entry, folder
        self._reports: dict[tuple, Inputs] = {}
        self.downloaded_to_check: list[str] = []

    # -- references and their light files ----------------------------------------------------
    def entries(self, refs: Sequence[str | os.PathLike]) -> list[Entry]:
        """Every reference resolved, a local typo failing before anything is asked of the Hub.

        Args:
            refs: local directories and/or Hub repo IDs.

        Returns:
            One `Entry` per reference, in order (the same object for a reference seen before).

        Raises:
            IngredientNotFoundError: a local path, repo or revision that does not exist.
            HubError: the Hub refused the token or cannot be reached.
            CheckpointError: an unreadable config or adapter config.
        """
        texts = [os.fspath(r) for r in refs]
        local_inputs(texts)
        return [self.entry(t) for t in texts]

    def entry(self, ref: str | os.PathLike) -> Entry:
        """One reference: a local folder as it is, a Hub repo pinned to its commit (one `model_info` per repo and
        revision) with its light files fetched (once per commit); an adapter's config read and checked.

        Args:
            ref: a local directory or Hub repo ID.

        Returns:
            Its `Entry`.

        Raises:
            IngredientNotFoundError: a local path, repo or revision that does not exist.
            HubError: the Hub refused the token or cannot be reached.
            CheckpointError: an unreadable config or adapter config.
        """
        text = os.fspath(ref)
        if text not in self._entries:
            source = self._source(text)
            if isinstance(source, Ingredient):
                light = source
            else:
                key = (source.repo_id, source.sha or source.revision)
                if key not in self._lights:
                    self._lights[key] = fetch_light(source, token=self.token)
                light = replace(self._lights[key], ref=text)
            adapter = read_adapter_config(light.path, text) if is_adapter_dir(light.path) else None
            self._entries[text] = Entry(source=source, light=light, adapter=adapter,
                                        weights=not isinstance(source, HubSource) or light.path in self._fetched)
        return self._entries[text]

    def _source(self, text: str) -> Ingredient | HubSource:
        key = split_ref(text)
        if key not in self._sources or isinstance(self._sources[key], Ingredient):
            # `org/a@<sha>` of a commit this run already resolved (a pinned reference of `tune`'s merges): known.
            known = [s for s in self._sources.values() if isinstance(s, HubSource) and s.sha
                     and (s.repo_id, s.sha) == key]
            self._sources[key] = replace(known[0], revision=key[1]) if known else plan_refs([text], token=self.token)[0]
        source = self._sources[key]
        return source if isinstance(source, Ingredient) else replace(source, ref=text)

    def config(self, entry: Entry) -> dict[str, Any]:
        """The entry's `config.json`, parsed once (an adapter has none: its base's counts).

        Args:
            entry: a model's entry.

        Returns:
            The parsed config.

        Raises:
            CheckpointError: it is missing or no valid JSON object.
        """
        folder = entry.light.path.resolve()
        if folder not in self._configs:
            self._configs[folder] = read_config(entry.light.path, entry.ref)
        return self._configs[folder]

    def tokenizer(self, folder: Path) -> TokenizerFiles:
        """The tokenizer files of a folder, read once.

        Args:
            folder: a model folder.

        Returns:
            Its `TokenizerFiles` (empty when it has none).
        """
        if folder not in self._tokenizers:
            self._tokenizers[folder] = read_tokenizer(folder)
        return self._tokenizers[folder]

    def tokenizer_dir(self, entry: Entry, base: Entry | None) -> Path:
        """The folder a model's tokenizer comes from: its own; for an adapter without any, its base's.

        Args:
            entry: the model's entry.
            base: the adapters' base, if any.

        Returns:
            The folder.
        """
        if entry.adapter is not None and base is not None and not self.tokenizer(entry.light.path).files:
            return base.light.path
        return entry.light.path

    # -- checking ------------------------------------------------------------------------------
    def check(self, refs: Sequence[str | os.PathLike], *, pivot: str | int = "mean", base: str | None = None,
              tokenizer_source: str | int = "auto", allow_dtype_mismatch: bool = False) -> "Inputs":
        """The compatibility report of `refs` (with a pivot checkpoint and the adapters' base), made once from
        configs, tokenizer files and safetensors headers: no Hub weight is downloaded (but `.bin`-only repos,
        which have no header, and adapters, which are small).

        Args:
            refs: the ingredients.
            pivot: `mean`, `first`, `base`, an ingredient index, or another checkpoint's reference.
            base: the base model of the PEFT adapters (default: each adapter's `base_model_name_or_path`).
            tokenizer_source: `auto`, `union`, `pivot`, `first`, an ingredient index, or a reference.
            allow_dtype_mismatch: dtype differences are notes (an output dtype was chosen).

        Returns:
            `Inputs`, whose `report` says whether they can be merged; `Inputs.open()` then downloads and opens.

        Raises:
            IngredientNotFoundError, HubError: a reference that cannot be resolved.
            CheckpointError: an unreadable config, adapter config or safetensors header.
        """
        key = (tuple(os.fspath(r) for r in refs), pivot, base, tokenizer_source, allow_dtype_mismatch)
        if key not in self._reports:
            self._reports[key] = self._check(list(key[0]), pivot, base, tokenizer_source, allow_dtype_mismatch)
        return self._reports[key]

    def _check(self, refs: list[str], pivot: str | int, base_ref: str | None, tokenizer_source: str | int,
               allow_dtype_mismatch: bool) -> "Inputs":
        pivot_ref = pivot if isinstance(pivot, str) and pivot not in PIVOT_WORDS else None
        source_ref = tokenizer_source if isinstance(tokenizer_source, str) and tokenizer_source not in SOURCE_WORDS \
            else None
        local_inputs([*refs, *[r for r in (pivot_ref, base_ref, source_ref) if r]])  # every typo before the Hub
        entries = self.entries(refs)
        pivot_entry = self.entry(pivot_ref) if pivot_ref else None
        base, errors = self._base(entries, base_ref, pivot == "base")
        inputs = Inputs(stage=self, entries=entries, pivot=pivot_entry, base=base, pivot_is_base=pivot == "base",
                        report=CompatibilityReport(names=[e.ref for e in entries]),
                        tokenizer_source=self.entry(source_ref) if source_ref else tokenizer_source,
                        pivot_index=pivot if isinstance(pivot, int) else 0)
        models = [e for e in [*entries, *([pivot_entry] if pivot_entry else []), *([base] if base else [])]
                  if e.adapter is None]
        errors += [line for e in models for line in config_refusals(e.ref, self.config(e))]
        errors += [r for e in entries if e.adapter is not None for r in adapter_refusals(e.ref, e.adapter)]
        if isinstance(pivot, int) and pivot >= len(entries):
            errors.append(f"pivot={pivot} is out of range for {len(entries)} ingredients (use 0..{len(entries) - 1})")
        if errors:  # config.json alone says no: not even the headers are read
            inputs.report.errors = list(dict.fromkeys(errors))  # an ingredient given twice: refused once
            return inputs
        base_ckpt = self._checkpoint(base) if base else None
        ckpts = [self._checkpoint(e, base_ckpt) for e in entries]
        pivot_ckpt = self._checkpoint(pivot_entry) if pivot_entry else (base_ckpt if pivot == "base" else None)
        inputs.allow_dtype_mismatch = allow_dtype_mismatch
        inputs.checked = [*ckpts, *([pivot_ckpt] if pivot_ckpt is not None else [])]
        self.report(inputs)
        if inputs.report.ok:  # the weights of sentence-transformers module folders are part of the model
            before = len(inputs.report.notes)
            inputs.modules = check_modules(entries, pivot_entry or (base if pivot == "base" else None), self._checkpoint,
                                           inputs.report, allow_dtype_mismatch=allow_dtype_mismatch)
            inputs.module_notes = inputs.report.notes[before:]
        return inputs

    def report(self, inputs: "Inputs") -> None:
        """The compatibility report of `inputs.checked` (the ingredients, then the pivot's checkpoint), made again
        by `Inputs.open` over the opened checkpoints when only their values say how transformers loads them.

        Args:
            inputs: the checked inputs, whose `report` is replaced.
        """
        n = len(inputs.entries)
        ckpts, pivot_ckpt = inputs.checked[:n], (inputs.checked[n] if len(inputs.checked) > n else None)
        every = [*inputs.entries, *([inputs.pivot] if inputs.pivot else [inputs.base] if inputs.pivot_is_base
                                    and inputs.base else [])]
        inputs.report = check_compatibility(
            ckpts, pivot=pivot_ckpt, allow_dtype_mismatch=inputs.allow_dtype_mismatch,
            tokenizer_source=inputs.vocabulary_source(),
            tokenizers=[self.tokenizer(self.tokenizer_dir(e, inputs.base)) for e in every],
            pivot_index=inputs.pivot_index)
        inputs.report.notes[:0] = [c.describe() for c in ckpts if isinstance(c, AdapterCheckpoint)]
        inputs.report.notes += [f"{ref} has .bin weights (no header to read): downloaded to check it"
                                for ref in dict.fromkeys(self.downloaded_to_check) if ref in inputs.report.names]
        inputs.report.notes += inputs.module_notes  # (made again by `open`: the module folders' stay as checked)

    def _base(self, entries: list[Entry], base_ref: str | None, pivot_is_base: bool) -> tuple[Entry | None, list[str]]:
        """The one base model every adapter is a fine-tune of (`base`, else the adapters' own), or errors, which
        name the keywords as a caller passes them (`base=REF`: `--base REF` in the CLI)."""
        adapters = [e for e in entries if e.adapter is not None]
        wanted = {e.ref: base_ref or adapter_base(e.adapter) for e in adapters}
        if not adapters and not base_ref:
            return None, (["pivot='base' needs PEFT adapters among the ingredients, or base=REF"] if pivot_is_base else [])
        missing = [ref for ref, b in wanted.items() if not b]
        if missing:
            return None, [f"{', '.join(missing)}: adapter_config.json names no base model; pass base=REF"]
        bases = self.entries(list(dict.fromkeys(wanted.values() or [base_ref])))
        if len({b.light.identity for b in bases}) > 1:
            named = "; ".join(f"{a} -> {wanted[a]}" for a in wanted)
            return None, [f"the adapters name different base models ({named}); they must share one: pass base=REF"]
        return bases[0], []

    def _checkpoint(self, entry: Entry, base: Checkpoint | None = None, folder: str = "") -> Checkpoint:
        """For the check: a Hub model (or one of its module folders) from its headers (`.bin` weights downloaded),
        a local one opened, an adapter (small: downloaded) over its base. Each once."""
        key = (entry.light.path.resolve(), entry.adapter is not None, id(base), folder)
        if key in self._checked:
            return self._checked[key]
        if entry.adapter is not None and not folder:
            if entry.remote and not entry.weights:
                entry.light = fetch_weights(entry.source, entry.light, files=list(ADAPTER_FILES), token=self.token)
                entry.weights = True
                self._fetched.add(entry.light.path)
            assert base is not None
            ckpt: Checkpoint = AdapterCheckpoint(entry.light.path, base, entry.ref, adapter_config=entry.adapter)
        elif entry.remote and not entry.weights:
            config = module_config(entry.light.path / folder) if folder else self.config(entry)
            try:
                header = header_checkpoint(entry.source, entry.light, config, variant=None if folder else self.variant,
                                           token=self.token, folder=folder)
            except CheckpointError as err:
                raise CheckpointError(f"{entry.ref}: {err}", path=err.path, fields=err.fields) from err
            if header is None:  # `.bin` weights have no header: downloaded to be checked
                self.downloaded_to_check.append(entry.ref)
                self.fetch([entry])
            ckpt = header or self._open(entry, folder)
            self._entry_of[id(ckpt)] = (entry, folder)
        else:
            ckpt = self._open(entry, folder)
        self._checked[key] = ckpt
        return ckpt

    def _open(self, entry: Entry, folder: str = "") -> Checkpoint:
        return (module_checkpoint(entry.light.path, folder, entry.ref) if folder  # a sentence-transformers module
                else Checkpoint(entry.light.path, name=entry.ref, variant=self.variant, config=self.config(entry)))

    # -- downloading and opening ---------------------------------------------------------------
    def fetch(self, entries: Sequence[Entry]) -> None:
        """Download the weights of the Hub entries that lack them: their size announced, the disk checked first.

        Args:
            entries: entries of this stage (local ones and those already fetched are skipped).

        Raises:
            InsufficientSpaceError: the cache's disk cannot hold them (nothing is downloaded).
            HubError, IngredientNotFoundError: a download failed.
        """
        remote = [e for e in dict.fromkeys(entries) if e.remote and not e.weights and e.adapter is None]
        needed = download_size([e.source for e in remote], [e.light for e in remote], self.variant)
        if needed:
            logger.info("downloading %s of weights from %d repo(s)", format_size(needed), len(remote))
            check_disk_space(needed, hub_cache())
        for e in remote:
            if e.light.path not in self._fetched:  # `org/a` and `org/a@<its sha>` share one snapshot
                e.light = fetch_weights(e.source, e.light, variant=self.variant, token=self.token)
                self._fetched.add(e.light.path)
            for same in self._entries.values():
                same.weights = same.weights or same.light.path in self._fetched

    def opened(self, checked: Checkpoint) -> Checkpoint:
        """A checked checkpoint readable: one known from its headers opened from its downloaded files (which must
        hold exactly the tensors checked), an adapter over its opened base; others as they are.

        Args:
            checked: a checkpoint the check saw (its weights fetched).

        Returns:
            The readable checkpoint (opened once).

        Raises:
            CheckpointError: the downloaded files differ from the checked headers, or cannot be read.
        """
        key = id(checked)
        if key not in self._opened:
            if isinstance(checked, AdapterCheckpoint):
                self._opened[key] = checked.with_base(self.opened(checked.base))
            elif checked.header_only:
                real = self._open(*self._entry_of[key])
                real.same_tensors(checked)
                self._opened[key] = real
            else:
                self._opened[key] = checked
        return self._opened[key]
