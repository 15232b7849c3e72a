"""Run one command and report its wall time and peak RSS as one JSON line:

    python benchmarks/measure.py --result r.json -- ame-hf merge ...
    {"rc": 0, "wall_s": 3.21, "max_rss_kib": 412345, "wrapper_rss_kib": 9876}

Why a wrapper: Python starts children with vfork, and Linux charges the parent's peak RSS to a
vforked child's ru_maxrss at exec. Measured from a big parent (the benchmark driver, or one that
imported torch), a small job would look as big as its parent. This process stays tiny, waits for
its one child with os.wait4 and reads that child's own ru_maxrss (KiB on Linux); its own peak
(`wrapper_rss_kib`) is the floor of what it can measure.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def main() -> int:
    args = sys.argv[1:]
    if len(args) < 4 or args[0] != "--result" or args[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    result_file, command = args[1], args[3:]
    started = time.perf_counter()
    child = subprocess.Popen(command)
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
        "wrapper_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    with open(result_file, "w", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    return 0 if child.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
