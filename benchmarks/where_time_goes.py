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
- for the default merge, the seconds its process spends in Python's cyclic garbage collector (`gc.callbacks`);
- the arithmetic alone: the engine's own functions (`spread.row_spreads` or `spread.mean_of` for the pivot,
  `engine.ame_block` for the steps) on the same blocks already in memory, one torch thread as a CPU merge: no reading,
  no checks, no writing. What is left to the merge's I/O and bookkeeping is the row above minus this one.
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


# The engine's arithmetic on every block of the inputs, held in memory (read before the clock starts, a tensor at a
# time): the pivot (the mean, with the spreads for a relative lr) and the steps, as `TensorMerger.run` computes them.
_ARITH = """
import json, sys, time
import torch
from safetensors import safe_open
from ame_hf.config import AmeConfig
from ame_hf.devices import keep_freed_memory
from ame_hf.engine import ame_block, ingredient_order
from ame_hf.plan import tensor_blocks
from ame_hf.spread import mean_of, relative_lr_value, row_spreads, spread_total
paths, opts = sys.argv[1:-1], json.loads(sys.argv[-1])
torch.set_num_threads(1)  # as a CPU merge (--threads, default 1)
keep_freed_memory()  # as the CLI: freed blocks serve the next ones, without faulting in fresh pages
config = AmeConfig(**opts).resolved()
n, order, spent = len(paths), ingredient_order(len(paths), config.epochs), 0.0
handles = [safe_open(f"{p}/model.safetensors", framework="pt") for p in paths]
for name in handles[0].keys():
    whole = [h.get_tensor(name).to(torch.float32, copy=True) for h in handles]
    blocks = [[x if rows is None else x[rows[0]:rows[1]] for x in whole]
              for rows in tensor_blocks(whole[0].shape, torch.device("cpu"))]
    started = time.perf_counter()
    if config.is_soup:  # from zeros, as the merge's soup
        pivots = [torch.zeros_like(xs[0]) for xs in blocks]
    elif config.relative_lr is not None:
        pivots, spreads = zip(*(row_spreads(xs.__getitem__, n, None) for xs in blocks))
        lr = relative_lr_value(config.relative_lr, spread_total(spreads), n * whole[0].numel())
    else:
        pivots = [mean_of(xs.__getitem__, n) for xs in blocks]
    for xs, pivot in zip(blocks, pivots):
        ame_block(xs.__getitem__, pivot, config, order, config.lr if config.relative_lr is None else lr, own_pivot=True)
    spent += time.perf_counter() - started
print(spent)
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
        arithmetic = [py, "-c", _ARITH, *map(str, inputs), json.dumps(api)]
        rows.append(("of which arithmetic: pivots and steps on blocks in memory, one thread",
                     median_of(args.runs, lambda: warm_seconds(arithmetic, inputs))))
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
