"""Language-model example: `tune --task text-generation` on the demo's tiny GPT-2 experts, with local text.

Three experts are fine-tuned from one base on three synthetic sequence tasks (`ame_hf.demo`: counting,
counting by 3, repeating a motif). Validation and test text mix the tasks; `tune` chooses on the
validation loss and the test loss (held out, used for no choice) is reported for the soup, the best
ingredient, the greedy soup and the tune pick.

    python examples/lm/run.py [--out DIR] [--steps 120] [--budget 12] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from ame_hf.demo import TASKS, TOKEN_WORDS, build_experts, make_batch  # noqa: E402
from ame_hf.tuning import DEFAULT_BUDGET, tune  # noqa: E402

HERE = Path(__file__).resolve().parent
# Validation is small (what a user would hold out); test is larger, for a steadier estimate.
VAL_PER_TASK, TEST_PER_TASK = 20, 200
# The mixture the merged model is asked to serve: more counting than the other tasks, so that the
# soup's equal weights are not automatically right.
MIX = {"count": 2, "skip3": 1, "repeat": 1}


def write_text(path: Path, per_task: int, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    lines = [" ".join(TOKEN_WORDS[i] for i in row.tolist())
             for task in TASKS for row in make_batch(task, per_task * MIX[task], gen)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_seed(work: Path, experts: list[Path], seed: int, budget: int) -> dict:
    val = write_text(work / "val.txt", VAL_PER_TASK, seed=1000 + seed)
    test = write_text(work / "test.txt", TEST_PER_TASK, seed=2000 + seed)
    started = time.perf_counter()
    result = tune(experts, work / "best", data=val, test_data=test, task="text-generation", budget=budget,
                  overwrite=True, progress=False, log=lambda line: print(line, file=sys.stderr))
    seconds = time.perf_counter() - started
    by_label = {c.label: c for c in result.candidates}
    ingredients = [c for c in result.candidates if c.label.startswith("ingredient ")]
    greedy = next(c for c in result.candidates if c.label.startswith("greedy soup"))
    return {
        "seed": seed, "seconds": seconds, "candidates": len(result.candidates), "pick": result.best.label,
        "greedy": greedy.label,
        "val": {"soup": by_label["soup"].score, "best ingredient": min(c.score for c in ingredients),
                "greedy soup": greedy.score, "tune pick": result.best.score},
        "test": {"soup": result.test_scores["soup"], "best ingredient": result.test_scores["best ingredient"],
                 "greedy soup": result.test_scores["greedy soup"], "tune pick": result.test_scores["selected"]},
        "table": [(c.label, c.score) for c in result.candidates],
    }


def report(runs: list[dict], steps: int, budget: int) -> str:
    methods = ["soup", "best ingredient", "greedy soup", "tune pick"]
    lines = ["# Language-model example: results", "",
             f"`python examples/lm/run.py` (seeds {', '.join(str(r['seed']) for r in runs)}; {steps} fine-tuning "
             f"steps per expert; `tune` budget {budget}, so {runs[0]['candidates']} candidates: 3 ingredients, "
             "the soup, the greedy soup and the AME grid). Three tiny GPT-2 experts (`ame_hf.demo`), one per "
             "synthetic task; validation and test text mix the tasks 2:1:1 (count : skip3 : repeat); "
             f"validation {VAL_PER_TASK * 4} documents, test {TEST_PER_TASK * 4}. Mean next-token loss in nats "
             "(lower is better). `tune` chose on validation only; **test played no part in any choice**. The "
             "experts are the demo's (deterministic); each seed draws other validation and test text.", "",
             "| method | validation loss | test loss | test perplexity |", "|---|---|---|---|"]
    for m in methods:
        v = statistics.mean(r["val"][m] for r in runs)
        t = statistics.mean(r["test"][m] for r in runs)
        lines.append(f"| {m} | {v:.4f} | {t:.4f} | {2.718281828459045 ** t:.2f} |")
    lines += ["", "Per seed (test loss):", "", "| seed | " + " | ".join(methods) + " | what tune picked | what the greedy soup kept |",
              "|---" * (len(methods) + 3) + "|"]
    for r in runs:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r['test'][m]:.4f}" for m in methods)
                     + f" | {r['pick']} | {r['greedy']} |")
    soup_gain = [r["test"]["soup"] - r["test"]["tune pick"] for r in runs]
    ing_gain = [r["test"]["best ingredient"] - r["test"]["tune pick"] for r in runs]
    lines += ["", "## Reading", "",
              f"- tune pick vs soup on test: {statistics.mean(soup_gain):+.4f} nats lower on average "
              f"(better in {sum(g > 0 for g in soup_gain)} of {len(runs)} seeds).",
              f"- tune pick vs best ingredient on test: {statistics.mean(ing_gain):+.4f} nats lower on average "
              f"(better in {sum(g > 0 for g in ing_gain)} of {len(runs)} seeds).",
              "- The validation figure of the tune pick is the best of all candidates by construction and so "
              "overestimates; the test column is the honest one.",
              f"- Wall time of `tune` per seed: {statistics.mean(r['seconds'] for r in runs):.0f} s on this machine.",
              "", "## Candidates of seed " + str(runs[0]["seed"]) + " (validation loss, best first)", "",
              "| candidate | validation loss |", "|---|---|"]
    lines += [f"| {label} | {score:.4f} |" for label, score in runs[0]["table"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE.parent / "_work" / "lm"), help="work folder (git-ignored)")
    parser.add_argument("--steps", type=int, default=120, help="fine-tuning steps per expert")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="tune budget")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--report", default=str(HERE / "RESULTS.md"), help="where to write the report")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The demo's experts are deterministic (fixed seeds); a seed here draws other validation and test text.
    experts = build_experts(Path(args.out) / "experts", steps=args.steps)
    runs = [run_seed(Path(args.out) / f"seed{s}", experts, int(s), args.budget) for s in args.seeds.split(",")]
    text = report(runs, args.steps, args.budget)
    Path(args.report).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
