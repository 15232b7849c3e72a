"""Run one command and report its wall time and peak RSS as one JSON line:

    python benchmarks/measure.py --result r.json -- ame-hf merge ...
    {"rc": 0, "wall_s": 3.21, "max_rss_kib": 412345, "read_kib": 2101234, "wrapper_rss_kib": 9876}

Why a wrapper: Python starts children with vfork, and Linux charges the parent's peak RSS to a
vforked child's ru_maxrss at exec. Measured from a big parent (the benchmark driver, or one that
imported torch), a small job would look as big as its parent. This process stays tiny, waits for
its one child with os.wait4 and reads that child's own ru_maxrss (KiB on Linux); its own peak
(`wrapper_rss_kib`) is the floor of what it can measure.

`read_kib`: what the child read through read()/pread() in all its threads (`rchar` of /proc/<pid>/io, read
after it exited and before it is reaped; null where there is no /proc): page-cache hits included, memory-mapped
files not (a `safe_open` that maps its file reads nothing here).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def _bytes_read(pid: int) -> int | None:
    """KiB the child `pid` read (`rchar`), once it has exited; it stays unreaped, for os.wait4."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        with open(f"/proc/{pid}/io", encoding="ascii") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines() if ": " in line)
        return int(fields["rchar"]) // 1024
    except (AttributeError, OSError, KeyError, ValueError):  # no waitid (not POSIX), no /proc
        return None


def main() -> int:
    args = sys.argv[1:]
    if len(args) < 4 or args[0] != "--result" or args[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    result_file, command = args[1], args[3:]
    started = time.perf_counter()
    child = subprocess.Popen(command)
    read_kib = _bytes_read(child.pid)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    result = {
        "rc": child.returncode,
        "wall_s": wall,
        "max_rss_kib": usage.ru_maxrss,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "disk_read_kib": usage.ru_inblock // 2,  # 512-byte blocks read from disk, not from the page cache
        "read_kib": read_kib,
        "wrapper_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    with open(result_file, "w", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    return 0 if child.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
