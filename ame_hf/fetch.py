"""Fetch Hub ingredients in the order a merge needs them: first the light files (config, tokenizer,
side files) and the safetensors headers (range requests), enough to check; the weights only after the
check passed, with their size announced and the cache's free space checked first."""

from __future__ import annotations

import fnmatch
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ._hub_errors import hub_errors
from ._model_files import CODE_PATTERNS, WEIGHT_PATTERNS
from ._model_files import module_folders
from ._weight_files import BIN_INDEX, BIN_SINGLE, SAFE_INDEX, SAFE_SINGLE, index_shards, weight_layout
from .checkpoint import Checkpoint, TensorInfo, dtype_from_name, stored_dtype
from .errors import HubError, InsufficientSpaceError
from .records import HubSource, Ingredient

logger = logging.getLogger(__name__)

_SHA = re.compile(r"^[0-9a-f]{40}$")
# The small file every model (or PEFT adapter) repo has: it locates a snapshot in the cache.
ANCHORS = ("config.json", "adapter_config.json")


def fetch_light(source: HubSource, *, token: str | None = None) -> Ingredient:
    """Download everything of `source` but weights and code (config, tokenizer, index, side files).

    Args:
        source: a Hub reference from `resolve.plan_refs` (offline: one without sha, found in the cache).
        token: Hub token for private or gated repos.

    Returns:
        The `Ingredient` whose `path` is the snapshot in the Hub cache (weights are fetched into it later).

    Raises:
        HubError: offline and not in the cache, the token refused, the Hub unreachable.
        IngredientNotFoundError: the repo or revision is gone.

    >>> from ame_hf.resolve import plan_refs
    >>> fetch_light(plan_refs(["org/model-a"])[0]).path  # doctest: +SKIP
    PosixPath('~/.cache/huggingface/hub/models--org--model-a/snapshots/0123...')
    """
    from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache

    with hub_errors(source.ref, source.repo_id, source.revision):
        if source.sha is None:
            # Offline: no API call possible. The cache maps the revision to a snapshot folder named by
            # its sha; only some files were downloaded, so ask for the folder, not a full snapshot.
            found = [try_to_load_from_cache(source.repo_id, f, revision=source.revision) for f in ANCHORS]
            cached = next((c for c in found if isinstance(c, str)), None)
            if cached is None:
                raise HubError(f"{source.ref}: {source.repo_id} is not in the local cache and HF_HUB_OFFLINE is "
                               "set; unset HF_HUB_OFFLINE to download it", repo_id=source.repo_id)
            path = Path(cached).parent
            return Ingredient(ref=source.ref, path=path, repo_id=source.repo_id, revision=source.revision,
                              sha=path.name if _SHA.match(path.name) else None)
        # The resolved sha, not the branch: what we record is exactly what we merge.
        path = Path(snapshot_download(source.repo_id, revision=source.sha, token=token,
                                      ignore_patterns=WEIGHT_PATTERNS + CODE_PATTERNS))
        anchor = next((f for f in ANCHORS if f in source.files), None)
        if anchor and not _SHA.match(source.revision or "main"):
            # Let the client note in its cache which commit the branch or tag named, so that
            # HF_HUB_OFFLINE=1 later finds `org/name[@branch]` (the file is there: not fetched again).
            hf_hub_download(source.repo_id, anchor, revision=source.revision or "main", token=token)
    return Ingredient(ref=source.ref, path=path, repo_id=source.repo_id, revision=source.revision, sha=source.sha)


def weight_files(source: HubSource, light: Ingredient, variant: str | None = None) -> list[str]:
    """The weight files of `source` a merge reads (safetensors first; `.bin` only when there is none), those of its
    sentence-transformers module folders (`modules.json`) included: paths in the repo.

    Args:
        source: the Hub reference (its file list; offline, the snapshot's files are listed instead).
        light: its light files (the index, which names the shards, and `modules.json`).
        variant: the weights variant (`model.NAME.safetensors`) of the model's own weights.

    Returns:
        The files to download: each folder's weight file, or its index and shards.

    Raises:
        CheckpointError: no weights (naming the variants there are), or an invalid index or `modules.json`.
    """
    out = folder_weights(source, light, "", variant)
    for folder in module_folders(light.path, light.ref):
        out += folder_weights(source, light, folder)
    return out


def folder_weights(source: HubSource, light: Ingredient, folder: str, variant: str | None = None) -> list[str]:
    """The weight files one folder of `source` holds ("": the model's own; a module folder: none if it has none).

    Args:
        source: the Hub reference.
        light: its light files.
        folder: the folder in the repo ("" for the model's own).
        variant: the weights variant.

    Returns:
        Paths in the repo.

    Raises:
        CheckpointError: the model's own folder has no weights, or an index is invalid.
    """
    prefix = f"{folder}/" if folder else ""
    listing = set(source.files) or {p.relative_to(light.path).as_posix() for p in light.path.rglob("*") if p.is_file()}
    here = {f[len(prefix):] for f in listing if f.startswith(prefix) and "/" not in f[len(prefix):]}
    if folder and not here & {SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX}:
        return []
    _, index, single = weight_layout(here, variant)
    if index is None:
        return [prefix + single] if single else []
    # The index came with the light files: it names the shards.
    return [prefix + index, *(prefix + f for f in index_shards(light.path / folder / index, light.ref))]


def header_checkpoint(source: HubSource, light: Ingredient, config: dict, *, variant: str | None = None,
                      token: str | None = None, folder: str = "") -> Checkpoint | None:
    """`source` (or one of its module folders) known from its `config` and safetensors headers, read with range
    requests (a few kB per file), without its weights; None for `.bin` weights, which have no header to read.

    Args:
        source: the Hub reference.
        light: its light files.
        config: its parsed `config.json` (a module folder's own config).
        variant: the weights variant.
        token: Hub token for private or gated repos.
        folder: a module folder in the repo, or "" for the model itself.

    Returns:
        A header-only `Checkpoint` (enough to check it, not to read it), or None.

    Raises:
        CheckpointError: as `weight_files`.
        HubError, IngredientNotFoundError: a header cannot be read from the Hub.
    """
    from huggingface_hub import HfApi

    prefix = f"{folder}/" if folder else ""
    files = [f[len(prefix):] for f in folder_weights(source, light, folder, variant) if not f.endswith(".json")]
    if not files or not all(f.endswith(".safetensors") for f in files):
        return None
    tensors: dict[str, TensorInfo] = {}
    unsupported: dict[str, str] = {}
    raw: dict[str, TensorInfo] = {}  # FP8 values: dequantized by the checkpoint
    api = HfApi(token=token)
    for file in files:
        with hub_errors(source.ref, source.repo_id, source.revision):
            meta = api.parse_safetensors_file_metadata(source.repo_id, prefix + file, revision=source.sha)
        for key, info in meta.tensors.items():
            dtype = dtype_from_name(info.dtype)
            if dtype is None:
                unsupported[key] = info.dtype
                if stored_dtype(info.dtype) is not None:
                    raw[key] = TensorInfo(file=file, shape=tuple(info.shape), dtype=stored_dtype(info.dtype))
            else:
                tensors[key] = TensorInfo(file=file, shape=tuple(info.shape), dtype=dtype)
    return Checkpoint.from_header(f"{light.ref}/{folder}" if folder else light.ref, config, tensors, unsupported,
                                  path=light.path / folder, raw=raw)


def download_size(sources: Sequence[HubSource], lights: Sequence[Ingredient], variant: str | None = None) -> int:
    """Bytes of weights still to download (files already in the cache count 0).

    Args:
        sources: Hub references.
        lights: their light files, in the same order.
        variant: the weights variant.

    Returns:
        The total, in bytes (a file whose size the Hub did not say counts 0).
    """
    total = 0
    for source, light in zip(sources, lights):
        for file in weight_files(source, light, variant):
            if not (light.path / file).exists():
                total += source.files.get(file) or 0
    return total


def check_disk_space(needed: int, where: Path) -> None:
    """Refuse, before downloading, a download the cache's disk cannot hold (with 5 % to spare).

    Args:
        needed: bytes to download.
        where: the folder they go to (the Hub cache; it may not exist yet).

    Raises:
        InsufficientSpaceError: the disk has too little free space.

    >>> check_disk_space(0, Path("."))
    """
    free = shutil.disk_usage(_existing(where)).free
    if needed and needed * 1.05 > free:
        raise InsufficientSpaceError(
            f"the ingredients' weights need {format_size(needed)} in {where} but only {format_size(free)} is free there; "
            "free some space, or set HF_HOME / HF_HUB_CACHE to a larger disk", path=where)


def fetch_weights(source: HubSource, light: Ingredient, *, variant: str | None = None,
                  files: list[str] | None = None, token: str | None = None) -> Ingredient:
    """Download `source`'s weights (at its sha; or the given `files`) into the snapshot that holds its light files.

    Args:
        source: the Hub reference (offline, without sha: nothing is downloaded).
        light: its light files.
        variant: the weights variant.
        files: exactly these files instead of the weights (an adapter's).
        token: Hub token for private or gated repos.

    Returns:
        `light` with the path of the snapshot now holding the weights.

    Raises:
        HubError, IngredientNotFoundError: the download failed.
        CheckpointError: as `weight_files`.
    """
    from huggingface_hub import snapshot_download

    if source.sha is None:
        return light  # offline: the cache holds what it holds
    files = files if files is not None else weight_files(source, light, variant)
    logger.info("downloading %s@%s", source.repo_id, source.sha)
    with hub_errors(source.ref, source.repo_id, source.revision):
        path = Path(snapshot_download(source.repo_id, revision=source.sha, token=token, allow_patterns=files))
    return replace(light, path=path)


def hub_cache() -> Path:
    """The Hub cache folder downloads go to (`HF_HUB_CACHE`).

    Returns:
        Its path.
    """
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_light(name: str) -> bool:
    """Whether a repo file is fetched with the light files: neither weights nor code.

    Args:
        name: a file name.

    Returns:
        True for config, tokenizer, index and side files.

    >>> is_light("tokenizer.json"), is_light("model.safetensors"), is_light("modeling_x.py")
    (True, False, False)
    """
    return not any(fnmatch.fnmatch(name, p) for p in WEIGHT_PATTERNS + CODE_PATTERNS)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def format_size(nbytes: float) -> str:
    """`1.23MB`, as tqdm writes sizes.

    Args:
        nbytes: a size in bytes.

    Returns:
        The size as text.

    >>> format_size(1_230_000)
    '1.23MB'
    """
    from tqdm import tqdm

    return tqdm.format_sizeof(nbytes, "B")
