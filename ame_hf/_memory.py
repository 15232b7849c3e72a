"""Keep freed tensor memory from piling up in the allocator while streaming.

glibc raises its mmap threshold after large frees, so repeated slice-sized buffers end up in the
heap and the resident size grows with every tensor read; a fixed threshold returns them to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_done = False


def return_large_frees_to_os(threshold: int = 1 << 20) -> None:
    """Allocations above `threshold` bytes are mmapped and unmapped on free (Linux/glibc only)."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return
    _done = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not libc.mallopt(_M_MMAP_THRESHOLD, threshold):
            logger.debug("mallopt(M_MMAP_THRESHOLD) refused")
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        logger.debug("mallopt unavailable; resident memory may grow with large tensors")
