"""Quiet transformers and huggingface_hub for the length of a block: no progress bars, no advisory warnings
(errors still show), and the process's own settings back afterwards, so a Python API call changes nothing."""

from __future__ import annotations

import importlib
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

_lock = threading.Lock()
_depth = 0  # blocks inside quiet_libraries(), in all threads: the first one in saves, the last one out restores
_saved: dict[str, Any] = {}


@contextmanager
def quiet_libraries(quiet: bool = True) -> Iterator[None]:
    """Within the block, transformers and huggingface_hub show no progress bar ("Loading weights",
    "Writing model shards", downloads) and log errors only; on exit their verbosity and progress-bar
    settings are what they were before, even after an exception.

    Their own switches do the work (`transformers.utils.logging`, `huggingface_hub.utils`); the state is
    global, so blocks may nest and overlap across threads: the last one to leave restores it.

    Args:
        quiet: False makes the block change nothing (for `with quiet_libraries(not progress):`).

    >>> with quiet_libraries():  # doctest: +SKIP
    ...     AutoModelForCausalLM.from_pretrained("gpt2")
    """
    if not quiet:
        yield
        return
    _enter()
    try:
        yield
    finally:
        _exit()


def _hub_bar_states() -> dict[str, bool] | None:
    # huggingface_hub keeps its progress-bar switches (global and per group) in this dict; a copy restores
    # them exactly, which enable_progress_bars() would not (it resets every group).
    return getattr(importlib.import_module("huggingface_hub.utils.tqdm"), "progress_bar_states", None)


def _enter() -> None:
    global _depth
    from huggingface_hub.utils import are_progress_bars_disabled
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    with _lock:
        _depth += 1
        if _depth > 1:
            return
        states = _hub_bar_states()
        _saved.update(hf_verbosity=hf_logging.get_verbosity(), hf_bars=hf_logging.is_progress_bar_enabled(),
                      hub_verbosity=hub_logging.get_verbosity(), hub_disabled=are_progress_bars_disabled(),
                      hub_states=None if states is None else dict(states))
        hf_logging.set_verbosity_error()
        hub_logging.set_verbosity_error()
        with warnings.catch_warnings():  # HF_HUB_DISABLE_PROGRESS_BARS=0 makes the hub say it keeps its bars
            warnings.simplefilter("ignore")
            hf_logging.disable_progress_bar()  # transformers' own bars, and the hub's (it calls the hub's switch)


def _exit() -> None:
    global _depth
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    with _lock:
        _depth -= 1
        if _depth > 0:
            return
        hf_logging.set_verbosity(_saved["hf_verbosity"])
        hub_logging.set_verbosity(_saved["hub_verbosity"])
        with warnings.catch_warnings():  # HF_HUB_DISABLE_PROGRESS_BARS=1: the hub refuses to enable, and says so
            warnings.simplefilter("ignore")
            if _saved["hf_bars"]:
                hf_logging.enable_progress_bar()  # also enables the hub's: set back just below
            states = _hub_bar_states()
            if states is not None and _saved["hub_states"] is not None:
                states.clear()
                states.update(_saved["hub_states"])
            elif _saved["hub_disabled"]:
                disable_progress_bars()
            else:
                enable_progress_bars()
        _saved.clear()
