"""Does `tune` with its default budget win on held-out data? (issue 24, item 3)

Two families of experts, each over several seeds and sizes; in every case `tune` (default grid, budget and
selection rule) chooses on validation data only and the chosen model, the soup and the best expert on validation
are scored on test data that played no part in any choice:

- **digits**: the paper-style example (`examples/digits/run.py`): a tiny ViT base, N experts fine-tuned
  on label-skewed shards of scikit-learn's digits (the "strong" fine-tuning), accuracy (higher is better).
- **lm**: the language example (`examples/lm/run.py`): three tiny GPT-2 experts (`ame_hf.demo`) fine-tuned
  for a number of steps, mean next-token loss in nats on the 2:1:1 task mixture (lower is better).

A case *wins* when tune's test score is at least max(soup, best expert on validation) (for a loss: at most
the min). The margin over the soup is in accuracy points (digits) or nats (lm), positive when tune is better.
`tune` selects with its default rule (`selection="guarded"`, `ame_hf.guard`); the what-if columns show what
`selection="best"` (the best validation score, the rule before) would have given: that candidate is rebuilt
from its config (or is the expert, or the greedy soup's kept experts) and scored on test, in the same run.

    python benchmarks/heldout.py [--seeds 0,1,2] [--digits-n 2,4] [--lm-steps 60,120] [--budget 12]
                                 [--digits-val-from-test K] [--oracle] [--out DIR] [--report-only] [--update-results]

`--digits-val-from-test K` moves K of the 540 test digits to the 180 validation digits (the experts stay the
same): how much `tune` gains over the soup with more labelled data to choose on.

`--oracle` (off by default) also scores every candidate tune built on test, after tune chose, and reports the
best one there: the ceiling of any selection rule with this candidate set.

A run writes cases.json and results.md into --out (default benchmarks/_work/heldout, git-ignored);
`--report-only` rebuilds results.md from cases.json; only `--update-results` also rewrites the committed benchmarks/RESULTS-heldout.md (recording the command and
the ame-hf commit). The examples' functions are imported from their scripts, not copied.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
COMMITTED = HERE / "RESULTS-heldout.md"
DIGITS_LR = 3e-3  # the digits example's "strong" fine-tuning: experts far enough apart for AME to differ


def example(name: str) -> Any:
    """examples/<name>/run.py as a module (both scripts are called run.py: load each under its own name)."""
    key = f"heldout_example_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "examples" / name / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[key]


def case_row(family: str, size: str, seed: int, higher: bool, val: dict[str, float], test: dict[str, float],
             pick: str, seconds: float, candidates: list[tuple[str, float]], best_pick: str,
             best_test: float) -> dict[str, Any]:
    """One case: the three scores on validation and test, whether tune reached max(soup, best expert) on test,
    and tune's margin over the soup (positive: better); the same for the what-if `selection="best"` pick."""
    sign = 1.0 if higher else -1.0
    bar = max(sign * test["soup"], sign * test["best expert"])
    return {"family": family, "size": size, "seed": seed, "higher_is_better": higher, "val": val, "test": test,
            "pick": pick, "wins": sign * test["tune"] >= bar - 1e-12,
            "margin": sign * (test["tune"] - test["soup"]) * (100.0 if higher else 1.0), "seconds": seconds,
            "candidates": candidates, "best_pick": best_pick, "best_test": best_test,
            "best_wins": sign * best_test >= bar - 1e-12,
            "best_margin": sign * (best_test - test["soup"]) * (100.0 if higher else 1.0)}


def more_validation(splits: dict[str, Any], count: int) -> dict[str, Any]:
    """The example's splits with `count` test digits (stratified, fixed seed) moved to validation: the experts,
    trained on the other splits, stay the same; only what `tune` chooses on and what scores its pick change."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    if count <= 0:
        return splits
    test = splits["test"]
    keep, move = train_test_split(np.arange(len(test.labels)), test_size=count, stratify=test.labels,
                                  random_state=0)
    val = splits["val"]
    joined = type(val)(np.concatenate([val.images, test.images[move]]), np.concatenate([val.labels, test.labels[move]]))
    return {**splits, "val": joined, "test": test.subset(keep)}


def digits_cases(seeds: Sequence[int], ns: Sequence[int], budget: int, out: Path,
                 oracle: bool = False, val_from_test: int = 0) -> list[dict[str, Any]]:
    import numpy as np

    from ame_hf.evaluation import load_data
    from ame_hf.tuning import default_grid, tune

    d = example("digits")
    splits = more_validation(d.load_splits(), val_from_test)
    pixels_01 = splits["public"].images / 255.0
    pixels = d.Pixels(mean=round(float(pixels_01.mean()), 3), std=round(float(pixels_01.std()), 3))
    data = out / "digits" / ("data" if val_from_test <= 0 else f"data-val+{val_from_test}")
    if not (data / "test").exists():
        d.write_image_folder(splits["val"], data / "val")
        d.write_image_folder(splits["test"], data / "test")
    val, test = load_data(data / "val", d.TASK), load_data(data / "test", d.TASK)
    plan, rows = d.FULL, []
    for seed in seeds:
        work = out / "digits" / f"seed{seed}"
        base = d.train(d.build_init(seed, pixels, work / "init"), splits["public"], plan.base_steps, d.BASE_LR,
                       seed, pixels, work / "base")
        private = splits["private"]
        for n in ns:
            started = time.perf_counter()
            shards = d.dirichlet_shards(private.labels, n, np.random.default_rng([seed, n]))
            # As the example's SeedRun.fine_tune: epochs, not steps, and the same per-expert seeds.
            experts = [d.train(base, private.subset(s), plan.expert_epochs * -(-len(s) // d.BATCH), DIGITS_LR,
                               1000 * seed + 10 * n + i, pixels, work / f"n{n}" / f"expert{i}")
                       for i, s in enumerate(shards)]
            result = tune(experts, work / f"n{n}" / "tune", data=val, test_data=test, task=d.TASK, budget=budget,
                          grid=default_grid(), overwrite=True, progress=False)
            rows.append(tune_case("digits", f"N={n}", seed, True, result, time.perf_counter() - started,
                                  what_if_best(result, experts, test, d.TASK, work / f"n{n}" / "best")))
            if oracle:
                add_oracle(rows[-1], *oracle_of(result, experts, test, d.TASK, work / f"n{n}" / "oracle"))
            print(summary_line(rows[-1]), flush=True)
    return rows


def per_example_correct(model_dir: Path, x: Any, labels: Any) -> Any:
    """1.0 where the model's class is the label, per validation digit (one batched forward pass)."""
    import numpy as np
    import torch
    from transformers import ViTForImageClassification

    with torch.no_grad():
        model = ViTForImageClassification.from_pretrained(model_dir).eval()
        return (model(pixel_values=x).logits.argmax(-1).numpy() == labels).astype(np.float64)


def per_document_nll(model_dir: Path, texts: Sequence[str]) -> tuple[Any, Any]:
    """(summed NLL, predicted tokens) per document, as `mean_token_nll` counts them."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from ame_hf.lm_evaluation import TextData, mean_token_nll

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    scored = [mean_token_nll(model, TextData("doc", [t]), batch_size=1, device="cpu") for t in texts]
    return np.array([loss * n for loss, n in scored]), np.array([float(n) for _, n in scored])


def lm_cases(seeds: Sequence[int], steps: Sequence[int], budget: int, out: Path,
             oracle: bool = False) -> list[dict[str, Any]]:
    from ame_hf.demo import build_experts
    from ame_hf.evaluation import load_data
    from ame_hf.tuning import tune

    lm, rows = example("lm"), []
    for n_steps in steps:
        # The demo's experts are deterministic for a number of steps; a seed draws other val and test text.
        experts = build_experts(out / "lm" / f"steps{n_steps}" / "experts", steps=n_steps)
        for seed in seeds:
            started = time.perf_counter()
            work = out / "lm" / f"steps{n_steps}" / f"seed{seed}"
            # As the example's run_seed: its validation and test text for this seed.
            val = lm.write_text(work / "val.txt", lm.VAL_PER_TASK, seed=1000 + seed)
            test = lm.write_text(work / "test.txt", lm.TEST_PER_TASK, seed=2000 + seed)
            result = tune(experts, work / "tune", data=val, test_data=test, task="text-generation", budget=budget,
                          overwrite=True, progress=False)
            test_data = load_data(test, "text-generation")
            rows.append(tune_case("lm", f"{n_steps} steps", seed, False, result, time.perf_counter() - started,
                                  what_if_best(result, experts, test_data, "text-generation", work / "best")))
            if oracle:
                add_oracle(rows[-1], *oracle_of(result, experts, test_data, "text-generation", work / "oracle"))
            print(summary_line(rows[-1]), flush=True)
    return rows


def what_if_best(result: Any, experts: Sequence[Path], test: Any, task: str, work: Path) -> tuple[str, float]:
    """The candidate `selection="best"` takes (the best validation score, first of `result.candidates`) and its test
    score (`test_of`)."""
    top = result.candidates[0]
    return label_of(top), test_of(top, result, experts, test, task, work)


def test_of(cand: Any, result: Any, experts: Sequence[Path], test: Any, task: str, work: Path,
            each: list[Any] | None = None) -> float:
    """A candidate's score on `test`: tune's own for its pick and the soup, else the candidate rebuilt (a merge of
    its config, the greedy soup's kept experts, or the expert itself) and scored; always rebuilt when `each` (a
    list that receives the per-example test scores) is given."""
    from ame_hf import AmeConfig, merge
    from ame_hf.evaluation import evaluate_model

    if each is None and cand is result.best:
        return result.test_scores["selected"]
    if each is None and cand.label == "soup" and cand.ingredient is None and cand.kept is None:
        return result.test_scores["soup"]
    if cand.ingredient is not None:
        path = experts[cand.ingredient]
    elif cand.kept is not None:
        path = merge([experts[k] for k in cand.kept], work, AmeConfig.soup(), overwrite=True, progress=False).path
    else:
        path = merge(experts, work, cand.config, overwrite=True, progress=False).path
    return evaluate_model(str(path), test, task, per_example=each)


def oracle_of(result: Any, experts: Sequence[Path], test: Any, task: str, work: Path) -> tuple[list[list[Any]], list]:
    """`--oracle`: every candidate tune built, [label, validation score, test score], in `result.candidates` order
    (best on validation first), and each one's per-example test scores (values, weights). Measured after tune
    chose: the test scores change no choice."""
    scored, per = [], []
    for c in result.candidates:
        each: list[Any] = []
        scored.append([label_of(c), c.score, test_of(c, result, experts, test, task, work, each)])
        per.append(each[0])
    return scored, per


def add_oracle(row: dict[str, Any], scored: list[list[Any]], per: list[Any]) -> None:
    """`row["oracle"]`: every candidate's [label, val, test, test on even examples, on odd]; the best on test (the oracle: no selection rule on
    this candidate set can do better), its margin over the soup and whether it beats max(soup, best expert) on
    test; the same for the best on test among the top 3 on validation, and the top 3's mean margin.

    The oracle's margin is biased up: it is the largest of many noisy test margins. `split_margin` removes that
    bias: the candidate best on one half of the test examples (alternate examples), scored against the soup on
    the other half, averaged over the two ways round (`per`: each candidate's per-example test scores)."""
    import numpy as np

    sign, unit = (1.0, 100.0) if row["higher_is_better"] else (-1.0, 1.0)
    values, weights = np.array([p[0] for p in per]), np.array([p[1] for p in per])
    halves = np.arange(values.shape[1]) % 2 == 0
    on = lambda i, half: values[i, half].sum() / weights[i, half].sum()  # noqa: E731
    soup = [c[0] for c in scored].index("soup")
    split = []
    for chosen, scored_on in ((halves, ~halves), (~halves, halves)):
        pick = max(range(len(scored)), key=lambda i: sign * on(i, chosen))  # the first of equals
        split.append(sign * (on(pick, scored_on) - on(soup, scored_on)) * unit)
    scored = [[*c, on(i, halves), on(i, ~halves)] for i, c in enumerate(scored)]  # + the even, the odd half
    margin = lambda score: sign * (score - row["test"]["soup"]) * unit  # noqa: E731
    bar = max(sign * row["test"]["soup"], sign * row["test"]["best expert"])
    best = max(scored, key=lambda c: sign * c[2])  # the first of equals: the better on validation
    top3 = max(scored[:3], key=lambda c: sign * c[2])
    row["oracle"] = {"candidates": scored, "pick": best[0], "test": best[2], "margin": margin(best[2]),
                     "beats": sign * best[2] > bar + 1e-12, "top3_pick": top3[0], "top3_margin": margin(top3[2]),
                     "top3_mean_margin": statistics.mean(margin(c[2]) for c in scored[:3]),
                     "split_margin": statistics.mean(split)}


def label_of(cand: Any) -> str:
    """How the tables name a candidate: a single expert (a greedy soup that kept one included) by its index."""
    return cand.label if cand.ingredient is None else f"expert {cand.ingredient}"


def tune_case(family: str, size: str, seed: int, higher: bool, result: Any, seconds: float,
              best: tuple[str, float]) -> dict[str, Any]:
    """A case from a `TuneResult` run with test data, and the what-if `selection="best"` (pick, test score)."""
    by_label = {c.label: c for c in result.candidates}
    ingredients = [c for c in result.candidates if c.config is None and c.kept is None]
    pick = label_of(result.best)
    best_val = (max if higher else min)(c.score for c in ingredients)
    val = {"soup": by_label["soup"].score, "best expert": best_val, "tune": result.best.score}
    test = {"soup": result.test_scores["soup"], "best expert": result.test_scores["best ingredient"],
            "tune": result.test_scores["selected"]}
    return case_row(family, size, seed, higher, val, test, pick, seconds,
                    [(c.label, c.score) for c in result.candidates], *best)


def signed(x: float) -> str:
    return f"{x + 0.0:+.4g}"  # + 0.0: a loss margin of -0.0 reads +0


def fmt(row: dict[str, Any], value: float) -> str:
    return f"{100 * value:.1f}" if row["higher_is_better"] else f"{value:.4f}"


def summary_line(row: dict[str, Any]) -> str:
    t = row["test"]
    return (f"  {row['family']} {row['size']} seed {row['seed']}: test soup {fmt(row, t['soup'])}, best expert "
            f"{fmt(row, t['best expert'])}, tune {fmt(row, t['tune'])} ({row['pick']}); "
            f"{'wins' if row['wins'] else 'LOSES'}, margin {signed(row['margin'])} ({row['seconds']:.0f} s)")


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The per-case table and the summary per family, computed from the rows."""
    lines = ["# tune's default budget on held-out data", "",
             f"Generated by `{meta['command']}` at ame-hf commit {meta['commit']} on {meta['date']} "
             f"({meta['seconds']:.0f} s, torch.set_num_threads(1)). `tune` budget {meta['budget']} (the default is "
             f"{meta['default_budget']}), default selection (`guarded`: the candidate with the largest one-sided 95 % "
             "lower bound on its paired per-example validation lead over the soup, when above 0; else the soup). "
             "digits: accuracy % (higher is better), margin in points; lm: mean next-token loss in nats (lower is "
             "better), margin in nats. *wins*: tune's test score is at least max(soup, best expert on validation). "
             "Test data played no part in any choice. *what-if best*: the candidate `selection=\"best\"` (the best "
             "validation score, the rule before) takes, rebuilt and scored on test in the same run."
             + (" digits: {} validation and {} test digits.".format(*meta["digits_val_test"])
                if meta.get("digits_val_test") else ""), "",
             "| family | size | seed | val: soup / best expert / tune | test: soup | test: best expert (val) | "
             "test: tune | tune pick | wins | margin over soup | what-if best: pick | test | wins, margin |",
             "|---" * 13 + "|"]
    for r in rows:
        v, t = r["val"], r["test"]
        same = r["best_pick"] == r["pick"]
        what_if = ("yes" if r["best_wins"] else "**no**") + f", {signed(r['best_margin'])}"
        lines.append(f"| {r['family']} | {r['size']} | {r['seed']} | {fmt(r, v['soup'])} / {fmt(r, v['best expert'])}"
                     f" / {fmt(r, v['tune'])} | {fmt(r, t['soup'])} | {fmt(r, t['best expert'])} | "
                     f"{fmt(r, t['tune'])} | {r['pick']} | {'yes' if r['wins'] else '**no**'} | {signed(r['margin'])} | "
                     f"{'(the same)' if same else r['best_pick']} | {fmt(r, r['best_test'])} | {what_if} |")
    lines += ["", "| family | rule | cases | ≥ max(soup, best expert) on test | mean margin over soup | worst margin | "
              "took the soup |", "|---|---|---|---|---|---|---|"]
    for family in [*dict.fromkeys(r["family"] for r in rows), "all"]:
        mine = [r for r in rows if family in ("all", r["family"])]
        for rule, prefix, pick in (("tune (default: guarded)", "", "pick"), ("what-if: selection=best", "best_",
                                                                              "best_pick")):
            margins = [r[prefix + "margin"] for r in mine]
            wins = sum(r[prefix + "wins"] for r in mine)
            soup = sum(r[pick] == "soup" for r in mine)
            mean = (signed(statistics.mean(margins)), signed(min(margins))) if family != "all" else ("—", "—")
            lines.append(f"| {family} | {rule} | {len(mine)} | {wins}/{len(mine)} ({100 * wins / len(mine):.0f} %) | "
                         f"{mean[0]} | {mean[1]} | {soup}/{len(mine)} |")
    if any("oracle" in r for r in rows):
        lines += oracle_report([r for r in rows if "oracle" in r])
    wins = sum(r["wins"] for r in rows)
    lines += ["", f"All cases: tune reached max(soup, best expert) on test in {wins}/{len(rows)} "
              f"({100 * wins / len(rows):.0f} %; the issue's target is ≥ 80 %)."]
    return "\n".join(lines) + "\n"


def oracle_report(rows: list[dict[str, Any]]) -> list[str]:
    """`--oracle`: per case and per family, the best candidate on test against the soup and tune's pick."""
    lines = ["", "## The ceiling: every candidate scored on test (`--oracle`)", "",
             "*oracle*: the candidate tune built (soup, greedy soup, experts, grid variants) that is best on test, "
             "chosen with the test data, so no rule choosing on validation can do better with these candidates. "
             "*beats*: its test score is above max(soup, best expert on validation). *top 3 on val*: the best on "
             "test among the 3 best on validation, and the mean margin of those 3. *split-half oracle*: the "
             "oracle's margin is the largest of many noisy test margins, so it is biased up; this one picks the best "
             "candidate on alternate test examples and scores its margin over the soup on the others (both ways "
             "round, averaged).", "",
             "| family | size | seed | candidates | test: soup | test: tune | oracle pick | test: oracle | "
             "oracle margin over soup | beats | split-half oracle margin | top 3 on val: best pick | its margin | "
             "top 3 mean margin | tune margin |", "|---" * 15 + "|"]
    for r in rows:
        o = r["oracle"]
        lines.append(f"| {r['family']} | {r['size']} | {r['seed']} | {len(o['candidates'])} | "
                     f"{fmt(r, r['test']['soup'])} | {fmt(r, r['test']['tune'])} | {o['pick']} | "
                     f"{fmt(r, o['test'])} | {signed(o['margin'])} | {'yes' if o['beats'] else 'no'} | "
                     f"{signed(o['split_margin'])} | {o['top3_pick']} | {signed(o['top3_margin'])} | "
                     f"{signed(o['top3_mean_margin'])} | {signed(r['margin'])} |")
    lines += ["", "| family | cases | oracle: mean margin over soup | min / max | beats max(soup, best expert) | "
              "split-half oracle: mean margin | top 3 on val, best on test: mean margin | top 3 on val: mean margin | "
              "tune: mean margin |", "|---" * 9 + "|"]
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        mean = lambda key: signed(statistics.mean(r["oracle"][key] for r in mine))  # noqa: E731
        margins = [r["oracle"]["margin"] for r in mine]
        beats = sum(r["oracle"]["beats"] for r in mine)
        lines.append(f"| {family} | {len(mine)} | {mean('margin')} | {signed(min(margins))} / "
                     f"{signed(max(margins))} | {beats}/{len(mine)} | {mean('split_margin')} | "
                     f"{mean('top3_margin')} | "
                     f"{mean('top3_mean_margin')} | {signed(statistics.mean(r['margin'] for r in mine))} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    from ame_hf.tuning import DEFAULT_BUDGET

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--digits-n", default="2,4", help="numbers of digits experts (default 2,4); '' skips digits")
    parser.add_argument("--lm-steps", default="60,120",
                        help="fine-tuning steps of the LM experts (default 60,120); '' skips lm")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help=f"tune budget (default {DEFAULT_BUDGET})")
    parser.add_argument("--out", type=Path, default=HERE / "_work" / "heldout",
                        help="work folder: models, cases.json and results.md (default benchmarks/_work/heldout)")
    parser.add_argument("--digits-val-from-test", type=int, default=0, metavar="K",
                        help="move K of the 540 test digits to the 180 validation digits (stratified; the experts "
                             "are the same): how tune's choice changes with more validation data (default 0)")
    parser.add_argument("--oracle", action="store_true",
                        help="also score every candidate tune built on test and report the best there (the ceiling "
                             "of any selection rule on this candidate set); chooses nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild results.md from --out/cases.json without running anything")
    parser.add_argument("--update-results", action="store_true",
                        help="also rewrite the committed benchmarks/RESULTS-heldout.md")
    args = parser.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    seeds, ns, steps = ints(args.seeds), ints(args.digits_n), ints(args.lm_steps)

    import torch
    from transformers.utils import logging as hf_logging

    sys.path.insert(0, str(REPO / "examples"))
    from _results import recorded_command, shown, source_commit

    if args.report_only:
        saved = json.loads((args.out / "cases.json").read_text(encoding="utf-8"))
        return write(report(saved["cases"], saved["meta"]), args.out, args.update_results, shown)
    commit = source_commit(("ame_hf", "examples", "benchmarks"))  # the code as it runs, before this run writes
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = (digits_cases(seeds, ns, args.budget, args.out, args.oracle, args.digits_val_from_test)
            + lm_cases(seeds, steps, args.budget, args.out, args.oracle))
    if not rows:
        parser.error("nothing to run: give --digits-n or --lm-steps")
    meta = {"command": recorded_command(__file__, sys.argv[1:] if argv is None else list(argv),
                                        {"--out": True, "--update-results": False}),
            "commit": commit, "date": datetime.date.today().isoformat(), "budget": args.budget,
            "default_budget": DEFAULT_BUDGET, "seconds": time.perf_counter() - started,
            "digits_val_test": [180 + args.digits_val_from_test, 540 - args.digits_val_from_test] if ns else None}
    (args.out / "cases.json").write_text(json.dumps({"meta": meta, "cases": rows}, indent=1), encoding="utf-8")
    return write(report(rows, meta), args.out, args.update_results, shown)


def write(text: str, out: Path, update_results: bool, shown: Any) -> int:
    """Print the report and write it to out/results.md (and the committed file with --update-results)."""
    print(text)
    for target in [out / "results.md", *([COMMITTED] if update_results else [])]:
        target.write_text(text, encoding="utf-8")
        print(f"wrote {shown(target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
