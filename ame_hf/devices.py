"""Devices and processes: which device this process computes on, its rank among the processes that
share a merge (torchrun / `accelerate launch`), barriers between them, and CPU threads."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import InvalidConfigError


@dataclass(frozen=True, kw_only=True)
class ProcessSetup:
    """This process's place in a merge: `rank` of `world` processes, computing on `device`.

    `state` is accelerate's `PartialState` when several processes or an accelerator are involved;
    None for a plain single CPU process (which then never imports accelerate: 0.6 s of start-up).
    """

    rank: int
    world: int
    device: torch.device
    state: Any = None

    @property
    def is_main(self) -> bool:
        """This is the process that downloads, stages and publishes (rank 0)."""
        return self.rank == 0


def process_setup(device: str | None) -> ProcessSetup:
    """Check `device` and ask accelerate (only when it matters) for this process's rank and device.

    Args:
        device: `cpu`, `cuda`, `cuda:1`, `mps`, ..., or None (accelerate's choice: the GPU when there is one).

    Returns:
        The `ProcessSetup`: rank and world size (torchrun / `accelerate launch`), and the device.

    Raises:
        InvalidConfigError: an unknown or unavailable device, or more processes than GPUs (naming `device`).

    >>> process_setup("cpu")
    ProcessSetup(rank=0, world=1, device=device(type='cpu'), state=None)
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is not None:
        try:
            wanted = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise InvalidConfigError(f"device={device!r} is not a device name (e.g. cpu, cuda, cuda:1, mps)",
                                     field="device") from err
        if wanted.type == "cuda" and (not torch.cuda.is_available() or (wanted.index or 0) >= torch.cuda.device_count()):
            raise InvalidConfigError(f"device={device!r}: no such CUDA device on this machine; use device='cpu'",
                                     field="device")
        if wanted.type == "mps" and not torch.backends.mps.is_available():
            raise InvalidConfigError(f"device={device!r}: MPS is not available on this machine; use device='cpu'",
                                     field="device")
    no_accelerator = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    cpu = device == "cpu" or (device is None and no_accelerator)
    if world <= 1 and cpu:
        return ProcessSetup(rank=0, world=1, device=torch.device("cpu"))
    from accelerate import PartialState

    # Without cpu=True accelerate ignores torchrun's WORLD_SIZE on a machine with no GPU and every
    # process would do the whole job.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if not cpu and device is None and torch.cuda.is_available() and local_world > torch.cuda.device_count():
        raise InvalidConfigError(
            f"launched {local_world} processes on this machine but it has {torch.cuda.device_count()} CUDA "
            "device(s); launch at most one process per GPU, or pass device='cpu'", field="device"
        )
    state = PartialState(cpu=cpu)
    if state.num_processes != world:
        raise InvalidConfigError(
            f"launched as {world} processes but accelerate set up {state.num_processes}; "
            "launch with torchrun or `accelerate launch` and the same device on every process", field="device"
        )
    chosen = torch.device(device) if device else state.device
    if chosen.type == "cuda" and chosen.index is None:
        # An explicit index: the I/O thread must use this process's GPU, not its own default (0).
        chosen = torch.device("cuda", torch.cuda.current_device())
    return ProcessSetup(rank=state.process_index, world=state.num_processes, device=chosen, state=state)


def barrier(setup: ProcessSetup) -> None:
    """Wait until every process of the merge gets here (nothing to do for one process).

    Args:
        setup: this process's `ProcessSetup`.
    """
    if setup.state is None or setup.world <= 1:
        return
    if setup.state.device.type == "cpu":
        # accelerate's wait_for_everyone passes device_ids=[local rank], which torch turns into a
        # CUDA device whenever the machine has one: CPU processes beyond the GPU count then fail
        # with "invalid device ordinal". A plain barrier on the gloo group needs no device.
        torch.distributed.barrier()
    else:
        setup.state.wait_for_everyone()


@contextmanager
def main_process_first(setup: ProcessSetup) -> Iterator[None]:
    """The main process runs the block first (it downloads); the others then find it in the cache.

    Args:
        setup: this process's `ProcessSetup`.

    Returns:
        A context manager.
    """
    if not setup.is_main:
        barrier(setup)
    yield
    if setup.is_main:
        barrier(setup)


def share_path(setup: ProcessSetup, path: Path | None) -> Path:
    """The main process's `path` (e.g. its staging directory), on every process.

    Args:
        setup: this process's `ProcessSetup`.
        path: the main process's path (the others' is ignored).

    Returns:
        The main process's path.

    >>> share_path(process_setup("cpu"), Path("staging"))
    PosixPath('staging')
    """
    if setup.world > 1:
        from accelerate.utils import broadcast_object_list

        path = Path(broadcast_object_list([str(path) if path else None])[0])
    assert path is not None
    return path


def share_object(setup: ProcessSetup, value: Any) -> Any:
    """The main process's `value` (picklable), on every process.

    Args:
        setup: this process's `ProcessSetup`.
        value: the main process's value (the others' is ignored).

    Returns:
        The main process's value.

    >>> share_object(process_setup("cpu"), {"a"})
    {'a'}
    """
    if setup.world > 1:
        from accelerate.utils import broadcast_object_list

        value = broadcast_object_list([value])[0]
    return value


@contextmanager
def cpu_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """torch intra-op threads for a CPU merge (default 1), restored afterwards.

    Args:
        device: where the merge runs (threads are set only for the CPU).
        threads: the threads to use, or None for 1.

    Returns:
        A context manager.

    Raises:
        InvalidConfigError: `threads` is below 1.
    """
    if threads is not None and threads < 1:
        raise InvalidConfigError(f"threads must be >= 1, got {threads}", field="threads")
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def keep_freed_memory(limit: int = 192 * 2**20) -> bool:
    """Let glibc keep freed memory (up to `limit` bytes, in one arena) for the next block and the next tensor
    instead of returning it.

    By default glibc serves blocks of a few MiB with fresh `mmap`s and trims what is freed, so every
    block read or computed faults in new zeroed pages (system time, not merge work). For a process
    that is only ame-hf (the CLI calls this; the Python API leaves the user's process alone); the
    arithmetic is untouched. One arena for all threads: the main thread and the I/O thread both allocate
    kept blocks and pivots (`_spread_pass`), and what one thread's arena kept could not serve the other's
    (with 256 MiB in two arenas, 3 x 3B bf16 peaked at 491-517 MiB, against 431 MiB with 64 MiB). 192 MiB
    holds a tensor's kept blocks and pivots (`--max-memory` 128 MiB and more) until the next tensor reuses
    them: with 64 MiB the 3 x 1.1B bf16 default merge faulted in 1.2 million fresh pages (5.6 s of system
    time), with this 41-47 thousand (3.5 s), at a peak of 391-412 MiB against 393-402 MiB; 4 x 134M fp32 and a
    3-layer 3 x 3B-shaped bf16 model stay at 331-334 and 432-439 MiB (393-403 with 64 MiB in two arenas).
    Before the spread pass used both threads, one arena alone (64 MiB kept) took the CLI default merge's
    peak from 475-502 to 426-437 MiB on 3 x 3B bf16: blocks read by the I/O thread were freed by the merging
    thread, and each thread's arena kept its own freed blocks. A thread started before this call keeps its arena.

    Args:
        limit: the most freed bytes glibc keeps.

    Returns:
        Whether it took effect (glibc only).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit; blocks are 4 MiB by default. The arena
    # limit applies to threads that allocate for the first time after it (the merge's I/O and writer threads).
    mallopt(_M_ARENA_MAX, 1)
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
