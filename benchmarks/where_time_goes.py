"""Where the wall time of an ame-hf merge goes: start-up (imports) against the merge itself.

    python benchmarks/where_time_goes.py            # 4 x 134M fp32 inputs from benchmarks/_work (built if missing)
    python benchmarks/where_time_goes.py --runs 5 --update-results

Each figure is the median of `--runs` fresh processes:
- `import torch`, and all a merge imports before it streams (ame-hf builds and steps torch.optim
  optimizers without the 1.9 s import of `torch._dynamo` torch.optim would trigger);
- the plain script (the floor of run.py), and the whole `ame-hf merge` process (soup, AME-Adam and
  the default merge, as in run.py);
- the same merge run a second time inside one process (imports done, optimizer classes warm): the
  merge work alone;
- for the default merge, the seconds its process spends in Python's cyclic garbage collector (`gc.callbacks`).
Writes the table to stdout and to <out>/PROFILE.md (default benchmarks/_work, git-ignored); the committed
benchmarks/PROFILE.md only with --update-results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from build_inputs import copy_dir  # noqa: E402
from run import CHILD_ENV, environment, prewarm  # noqa: E402

CHILD_ENV_FULL = {**os.environ, **CHILD_ENV}
JOBS = {"soup": ["--optimizer", "sgd"], "AME-Adam (lr 1e-4)": ["--optimizer", "adam", "--lr", "1e-4"],
        "default (adam, relative lr 0.005)": []}

_WARM = """
import json, sys, time
import ame_hf
paths, out, opts = sys.argv[1:5], sys.argv[5], json.loads(sys.argv[6])
ame_hf.merge(paths, out, overwrite=True, progress=False, device="cpu", **opts)
started = time.perf_counter()
ame_hf.merge(paths, out, overwrite=True, progress=False, device="cpu", **opts)
print(time.perf_counter() - started)
"""

# The CLI merge in a process that adds up its garbage collections (gc.callbacks) and prints the seconds.
_GC = """
import gc, sys, time
spent, started = [0.0], [0.0]
def timed(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        spent[0] += time.perf_counter() - started[0]
gc.callbacks.append(timed)
from ame_hf.cli import main
rc = main(sys.argv[1:])
print(spent[0])
sys.exit(rc)
"""


def wall(cmd: list[str], inputs: list[Path] = ()) -> float:
    prewarm(inputs)  # inputs from the page cache, as in run.py
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=CHILD_ENV_FULL)
    return time.perf_counter() - started


def warm_seconds(cmd: list[str], inputs: list[Path]) -> float:
    prewarm(inputs)
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True, env=CHILD_ENV_FULL).stdout)


def median_of(runs: int, fn) -> float:
    return statistics.median(fn() for _ in range(runs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", "--work", type=Path, default=HERE / "_work",
                   help="work directory: inputs, outputs and PROFILE.md (default benchmarks/_work, git-ignored)")
    p.add_argument("--update-results", action="store_true", help="also rewrite the committed benchmarks/PROFILE.md")
    args = p.parse_args(argv)
    models = args.out / "models"
    inputs = [copy_dir(models, "small", "fp32", i) for i in range(4)]
    if not all((d / ".complete").is_file() for d in inputs):
        subprocess.run([sys.executable, str(HERE / "build_inputs.py"), "--model", "small", "--copies", "4",
                        "--out", str(models)], check=True)
    out = args.out / "outputs" / "where_time_goes"
    py = sys.executable
    rows = [
        ("`import torch`", median_of(args.runs, lambda: wall([py, "-c", "import torch"]))),
        ("`import ame_hf.cli, ame_hf.merging` (what a merge imports before it streams)",
         median_of(args.runs, lambda: wall([py, "-c", "import ame_hf.cli, ame_hf.merging"]))),
        ("plain script (`plain_average.py`, the floor): whole process",
         median_of(args.runs, lambda: wall([py, str(HERE / "plain_average.py"), *map(str, inputs), "--out",
                                            str(args.out / "outputs" / "where_time_goes_plain")], inputs))),
    ]
    for label, opts in JOBS.items():
        cmd = [py, "-m", "ame_hf", "merge", *map(str, inputs), "--out", str(out), "--overwrite", "--quiet",
               "--device", "cpu", *opts]
        rows.append((f"`ame-hf merge`, {label}: whole process", median_of(args.runs, lambda: wall(cmd, inputs))))
        if not opts:  # the default merge: how much of it the cyclic garbage collector takes (`cli.imports_without_gc`)
            collect = [py, "-c", _GC, *cmd[3:]]
            rows.append(("of which garbage collection (`gc.callbacks`)",
                         median_of(args.runs, lambda: warm_seconds(collect, inputs))))
        api = {"optimizer": opts[1], **({"lr": float(opts[3])} if len(opts) > 2 else {})} if opts else {}
        warm = [py, "-c", _WARM, *map(str, inputs), str(out), json.dumps(api)]
        rows.append(("the same merge, second run in one process (the merge work alone)",
                     median_of(args.runs, lambda: warm_seconds(warm, inputs))))
    env = environment("mergekit not used")
    lines = ["# Where the time of a merge goes", "",
             f"- command: `python benchmarks/where_time_goes.py --runs {args.runs}`; 4 x 134M fp32 inputs, `--device cpu`",
             f"- machine: {env['machine']}", f"- software: {env['software'].split('; mergekit')[0]}", "",
             f"| what (median of {args.runs} processes) | seconds |", "|---|---|"]
    lines += [f"| {what} | {seconds:.2f} |" for what, seconds in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    for target in [args.out / "PROFILE.md", *([HERE / "PROFILE.md"] if args.update_results else [])]:
        target.write_text(text)
        print(f"wrote {target}")
    for folder in (out, args.out / "outputs" / "where_time_goes_plain"):
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
