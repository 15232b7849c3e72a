"""How long lm-eval's bootstrap of a standard error takes, at ame-hf's 1000 draws and at lm-eval's default 100000.

    python benchmarks/lm_eval_bootstrap.py                       # f1 over 20 documents: 1000 and 100000 draws
    python benchmarks/lm_eval_bootstrap.py --iters 1000 --pool   # also in lm-eval's process pool

lm-eval bootstraps the standard error of every metric it does not average (f1, mcc, bleu, a median), once per task
and run, so `tune` pays it for every candidate. This times `lm_eval.api.metrics.bootstrap_stderr` on f1 over
`--documents` random (gold, prediction) pairs, in this process (`DISABLE_MULTIPROC`, as ame-hf runs it) and, with
`--pool`, in lm-eval's process pool (its default). Prints a Markdown table; writes nothing. Needs ame-hf[lm-eval].
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import time
import warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", default="1000,100000", help="comma-separated numbers of draws")
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--pool", action="store_true", help="also time lm-eval's process pool")
    args = parser.parse_args()
    from lm_eval.api.metrics import bootstrap_stderr, f1_score

    rnd = random.Random(0)
    items = [(rnd.randint(0, 1), rnd.randint(0, 1)) for _ in range(args.documents)]
    print(f"| draws | where | seconds (f1 over {args.documents} documents) |\n|---|---|---|")
    for iters in (int(x) for x in args.iters.split(",")):
        for pool in (False, True) if args.pool else (False,):
            if pool:
                os.environ.pop("DISABLE_MULTIPROC", None)
            else:
                os.environ["DISABLE_MULTIPROC"] = "1"
            started = time.perf_counter()
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")  # sklearn's ill-defined f1 on a draw without positives
                bootstrap_stderr(f1_score, items, iters)
            where = f"process pool ({os.cpu_count()} workers)" if pool else "in process"
            print(f"| {iters} | {where} | {time.perf_counter() - started:.1f} |", flush=True)


if __name__ == "__main__":
    main()
