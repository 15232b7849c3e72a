"""The command line of evaluation and selection: `ame-hf evaluate`, `ame-hf tune` and `merge`'s
`--eval-data` / `--greedy-soup` options, their validation and their printed tables. Argument parsing and
printing only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from ._cli_options import REF_HELP, add_common, add_config_options, add_token, command_parser, config_values, whole
from ._options import config_with, evaluation_options, tune_options
from ._validators import whole_number
from .card_results import update_card
from .config import OUTPUT_FIELDS, WEIGHT_FIELDS, AmeConfig
from .errors import InvalidConfigError
from .evaluation import TASKS, check_scorable, higher_is_better, load_data, metric_for, task_for_models
from .lm_evaluation import perplexity

DEFAULT_BUDGET = 12  # tuning.DEFAULT_BUDGET (not imported: it loads torch)


def add_task_options(p: argparse.ArgumentParser, *, test_data: bool) -> None:
    """`--task`, `--metric`, `--max-length`, `--eval-batch-size` (and `--test-data`) of any evaluating command."""
    p.add_argument("--task", default=None, choices=list(TASKS),
                   help="task (default: from the model's architecture: *ForSequenceClassification -> "
                        "text-classification, *ForImageClassification -> image-classification, *ForCausalLM / "
                        "*LMHeadModel -> text-generation)")
    p.add_argument("--metric", default=None, metavar="NAME",
                   help="accuracy (default) or macro_f1 (bundled, offline), or a local evaluate metric folder; "
                        "text-generation: loss (default: mean NLL per token, lower is better) or perplexity")
    p.add_argument("--max-length", type=whole, default=None, metavar="N",
                   help="text-generation: truncate documents to this many tokens (default: the model's limit)")
    p.add_argument("--eval-batch-size", type=whole, default=None, metavar="N",
                   help="examples per forward pass (default 32; text-generation 8 documents)")
    add_lm_eval_options(p)
    if test_data:
        p.add_argument("--test-data", default=None, metavar="FILE",
                       help="held-out data, used for no choice: scores the selected model, the soup and the best "
                            "ingredient, and that goes into the card's model-index")


def add_lm_eval_options(p: argparse.ArgumentParser) -> None:
    """lm-evaluation-harness tasks as the score (`lm_harness`): the flags of the `lm_eval_*` keywords."""
    g = p.add_argument_group("lm-evaluation-harness tasks as the score (pip install 'ame-hf[lm-eval]')")
    g.add_argument("--lm-eval-tasks", metavar="NAME[=W],...", help="score by these lm-eval tasks instead of "
                   "data: the metric averaged over them, weighted by W (default 1)")
    g.add_argument("--lm-eval-include", metavar="DIR", help="a folder of local task YAMLs (lm-eval's --include_path)")
    g.add_argument("--lm-eval-metric", metavar="NAME", help="the metric as lm-eval names it (default acc,none; "
                   "acc_norm,none, ...)")
    g.add_argument("--lm-eval-limit", type=whole, metavar="N", help="score the first N documents of each task")
    g.add_argument("--lm-eval-num-fewshot", type=whole, metavar="N",
                   help="few-shot examples per prompt (default: each task's own)")


def lm_eval_data(args: argparse.Namespace, data_flag: str = "--data") -> None:
    """`args.data` becomes the `LmEvalTasks` the `--lm-eval-*` flags describe (one of the two is the score).

    Raises:
        InvalidConfigError: both given, or an `--lm-eval-*` flag without `--lm-eval-tasks` (exit 2).
    """
    from .lm_harness import lm_eval_tasks

    spec = lm_eval_tasks(args.lm_eval_tasks, include=args.lm_eval_include, metric=args.lm_eval_metric,
                         limit=args.lm_eval_limit, num_fewshot=args.lm_eval_num_fewshot)
    if spec is None:
        return
    if args.data:
        raise InvalidConfigError(f"give {data_flag} or --lm-eval-tasks, not both: each is the score")
    if args.metric is not None:
        raise InvalidConfigError("with --lm-eval-tasks the metric is --lm-eval-metric (e.g. acc_norm,none)")
    if getattr(args, "test_data", None):
        raise InvalidConfigError("--test-data goes with data files, not --lm-eval-tasks; score the output on other "
                                 "tasks with `ame-hf evaluate`")
    args.data = spec


def data_name(data: Any) -> str:
    """How the card names the data: a file's stem, or the lm-eval tasks."""
    return data.name if hasattr(data, "tasks") else Path(data).stem


_DATA_HELP = ("data: JSONL/CSV with text|image and label columns, or an image folder; text-generation: a .txt "
              "file (one document per line) or JSONL with a text field")


def add_evaluate_parser(sub: Any) -> argparse.ArgumentParser:
    e = command_parser(sub, "evaluate", help="evaluate models on local data (offline)",
                       description="Score models (merge outputs, local folders, Hub repo IDs, PEFT adapters) on local "
                                   "data, offline; the task comes from the architecture unless --task says.",
                       examples=["ame-hf evaluate merged org/a org/b --data val.jsonl",
                                 "ame-hf evaluate merged --data val.txt --metric perplexity --update-card merged",
                                 "ame-hf evaluate ./lora-a --data val.txt --base org/base --device cuda"])
    e.add_argument("models", nargs="+", metavar="MODEL", help="a model: " + REF_HELP)
    e.add_argument("--data", metavar="FILE", help=_DATA_HELP + " (or --lm-eval-tasks)")
    add_task_options(e, test_data=False)
    e.add_argument("--device", help="where the models run (default: the GPU when there is one)")
    e.add_argument("--update-card", metavar="DIR",
                   help="write the first model's result into DIR's model card (model-index)")
    add_config_options(e, only=("base",))  # PEFT adapters among the models: merge's own --base
    add_token(e)
    add_common(e)
    e.set_defaults(func=cmd_evaluate, validate=validate_evaluate)
    return e


def add_tune_parser(sub: Any) -> argparse.ArgumentParser:
    t = command_parser(sub, "tune", help="pick the best of soup, greedy soup, ingredients and AME variants on "
                                         "validation data",
                       description="Merge and score candidates (the soup, the greedy soup, each ingredient and "
                                   "--budget AME variants) on validation data, and write the best.",
                       examples=["ame-hf tune org/a org/b org/c -o best --data val.jsonl --test-data test.jsonl",
                                 "ame-hf tune ./lora-a ./lora-b -o best --data val.txt --base org/base --budget 4",
                                 "ame-hf tune ./a ./b -o best --data val.txt --dtype bfloat16 --max-shard-size 2GB"])
    t.add_argument("refs", nargs="+", metavar="REF", help="ingredient: " + REF_HELP)
    # Not required by argparse: a missing --out is the validation step's usage error, as for merge.
    t.add_argument("-o", "--out", metavar="DIR", help="output folder for the chosen model")
    t.add_argument("--data", metavar="FILE", help="validation " + _DATA_HELP + " (or --lm-eval-tasks)")
    add_task_options(t, test_data=True)
    t.add_argument("--budget", type=whole, default=DEFAULT_BUDGET,
                   help=f"number of AME variants to try (default {DEFAULT_BUDGET}; each is a merge and an evaluation)")
    t.add_argument("--selection", choices=("guarded", "best"), default="guarded",
                   help="guarded (default): the candidate that beats the soup by most beyond validation noise, else "
                        "the soup; best: the best validation score")
    t.add_argument("--device", help="where merges and evaluations run (default: GPU when there is one)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a previous ame-hf output at --out (never an input, the cwd or a folder of yours)")
    t.add_argument("--resume", action="store_true",
                   help="continue the tune of --out that the same command started and that stopped (kill -9, power "
                        "loss): recorded scores are not computed again; if there is none, start from the beginning")
    # The output options of every merge tune runs (it tries its own optimizer, lr, pivot, ...).
    add_config_options(t, only=OUTPUT_FIELDS)
    add_token(t)
    add_common(t)
    t.set_defaults(func=cmd_tune, validate=validate_tune)
    return t


def add_merge_options(m: argparse.ArgumentParser) -> None:
    """`merge --eval-data ...` and `merge --greedy-soup`."""
    m.add_argument("--eval-data", dest="data", metavar="FILE", help="evaluate the merge (and its ingredients) on this data "
                                                  "and record the result in the card")
    m.add_argument("--greedy-soup", action="store_true",
                   help="instead of AME: the greedy soup (ingredients by --eval-data score, each kept if the soup "
                        "does not get worse), written as the soup of the kept ones")
    add_task_options(m, test_data=True)


def validate_merge_evaluation(args: argparse.Namespace, values: dict[str, Any]) -> None:
    """`merge`'s `--eval-data` / `--greedy-soup` options; `values` are the `AmeConfig` fields given.

    Raises:
        InvalidConfigError: a usage error (exit 2).
    """
    lm_eval_data(args, "--eval-data")
    if args.greedy_soup and not args.data:
        raise InvalidConfigError("--greedy-soup needs --eval-data or --lm-eval-tasks (what to choose the ingredients by)")
    if args.test_data and not args.greedy_soup:
        raise InvalidConfigError("--test-data goes with --greedy-soup (or `ame-hf tune`); to score a merge on more "
                                 "data, use `ame-hf evaluate`")
    if args.greedy_soup:
        given = [k for k in values if k in WEIGHT_FIELDS]
        if given:
            raise InvalidConfigError(f"the greedy soup is a uniform soup of the ingredients it keeps; drop "
                                     f"{', '.join(given)}", fields=given)
    for name in ("max_length", "eval_batch_size"):
        if getattr(args, name) is not None:
            whole_number(name, getattr(args, name))


def validate_evaluate(args: argparse.Namespace) -> None:
    """`evaluate`'s options. Raises: InvalidConfigError, a usage error (exit 2)."""
    _need_data(args)
    evaluation_options(max_length=args.max_length, batch_size=args.eval_batch_size)
    config_with(None, config_values(args))  # --base


def _need_data(args: argparse.Namespace) -> None:
    lm_eval_data(args)
    if not args.data:
        raise InvalidConfigError("no data to score on: pass --data FILE or --lm-eval-tasks NAME")


def validate_tune(args: argparse.Namespace) -> AmeConfig:
    """`tune`'s options, and the output options of its merges (with `--base`) as an `AmeConfig`.

    Raises:
        InvalidConfigError: a usage error (exit 2).
    """
    if not args.out:
        raise InvalidConfigError("no output directory: pass --out DIR")
    _need_data(args)
    return tune_options(args.refs, budget=args.budget, config=config_with(None, config_values(args)),
                        max_length=args.max_length, batch_size=args.eval_batch_size)


def check_before_merge(args: argparse.Namespace, refs: Sequence[str], config: AmeConfig) -> Any:
    """The evaluation must be possible before the merge starts, not found impossible after it: the models are
    resolved by the input stage (light files only; a PEFT adapter with its base), the task, data and tokenizers
    checked. Returns that `InputStage` for the merge to share (None without `--eval-data`)."""
    if not args.data:
        return None
    from .full_models import resolve_models
    from .inputs import InputStage

    stage = InputStage(token=args.token, variant=config.variant)
    # The merge's own check first: incompatible ingredients are named as such, before the task and data.
    stage.check(refs, pivot=config.pivot, base=config.base, tokenizer_source=config.tokenizer_source,
                allow_dtype_mismatch=config.dtype != "auto").raise_for_errors()
    models = resolve_models(refs, base=config.base, stage=stage)
    args.task = task_for_models([(m.name, m.config) for m in models], args.task)
    for path in (args.data, args.test_data):
        if path:
            load_data(path, args.task)
    args.metric = metric_for(args.task, args.metric, args.data)
    check_scorable([m.tokenizer for m in models], args.task)
    return stage


def merge_greedy(args: argparse.Namespace, refs: Sequence[str], out: str, config: AmeConfig) -> Path:
    from .selection import greedy_soup

    result = greedy_soup(refs, out, data=args.data, test_data=args.test_data, task=args.task, metric=args.metric,
                         config=config, max_length=args.max_length,
                         batch_size=args.eval_batch_size, device=args.device, token=args.token,
                         overwrite=args.overwrite, log=None if args.quiet else _err)
    rows = [(f"ingredient {i}: {r}", s) for i, (r, s) in enumerate(zip(refs, result.ingredient_scores))]
    print(table([("greedy soup", result.score)] + rows, args.metric))
    print(f"greedy soup kept ingredients {', '.join(map(str, result.kept))} of {len(refs)} -> {result.path}")
    if result.test_scores:
        print(table(list(result.test_scores.items()), f"{args.metric} (test)"))
    return result.path


def evaluate_merge(args: argparse.Namespace, result: Any) -> None:
    label = Path(result.path).absolute().name  # the output as the user named it (not "merged" whatever --out is)
    rows = _evaluate_rows([str(result.path)] + [str(i.path) for i in result.ingredients], args,
                          labels=[label] + [i.display_name for i in result.ingredients], base=result.config.base)
    update_card(result.path, rows, task=args.task, dataset=data_name(args.data), metric=args.metric)
    if hasattr(args.data, "tasks"):
        from .lm_harness import record

        record(result.path, args.data, scored_as=result.path, device=getattr(args, "device", None),
               batch_size=args.eval_batch_size, max_length=args.max_length, progress=not args.quiet)
    print(table(rows, args.metric))


def _evaluate_rows(models: Sequence[str], args: argparse.Namespace, labels: Sequence[str] | None = None,
                   base: str | None = None) -> list[tuple[str, float]]:
    from .api import evaluate

    result = evaluate(models, data=args.data, task=args.task, metric=args.metric,
                      base=base or getattr(args, "base", None), token=getattr(args, "token", None),
                      max_length=args.max_length, batch_size=args.eval_batch_size,
                      device=getattr(args, "device", None), progress=not args.quiet)
    args.task, args.metric = result.task, result.metric
    return [((labels or models)[i], score) for i, (_, score) in enumerate(result.scores)]


def table(rows: Sequence[tuple[str, float]], metric: str) -> str:
    """`label  score` rows under a header naming the metric and its direction (a loss with its perplexity)."""
    base = metric.split(" ")[0]
    head = f"{metric} ({'higher' if higher_is_better(base) else 'lower'} is better)"
    width = max(len("model"), *(len(label) for label, _ in rows))
    ppl = base == "loss"
    lines = [f"{'model':{width}s}  " + (f"{'perplexity':>10s}  " if ppl else "") + head,
             "-" * (width + 2 + max(len(head), 8) + (12 if ppl else 0))]
    # The score is the last field of a row (tests and scripts read it so); perplexity comes before it.
    lines += [f"{label:{width}s}  " + (f"{perplexity(value):10.3f}  " if ppl else "") + f"{value:.4f}"
              for label, value in rows]
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace, options: None) -> int:
    rows = _evaluate_rows(args.models, args)  # the task (given or inferred) fits every model, or nothing runs
    print(table(rows, args.metric))
    if args.update_card:
        update_card(args.update_card, rows, task=args.task, dataset=data_name(args.data), metric=args.metric)
        if not args.quiet:
            _err(f"updated the model card in {args.update_card}")
    return 0


def cmd_tune(args: argparse.Namespace, output: AmeConfig) -> int:
    from .devices import keep_freed_memory
    from .tuning import tune

    keep_freed_memory()  # a process of ours: every candidate's merge reuses the freed blocks
    result = tune(args.refs, args.out, data=args.data, test_data=args.test_data, task=args.task, metric=args.metric,
                  config=output, budget=args.budget, max_length=args.max_length, batch_size=args.eval_batch_size,
                  device=args.device, token=args.token, overwrite=args.overwrite, progress=not args.quiet,
                  log=None if args.quiet else _err, selection=args.selection, resume=args.resume)
    print(table([(c.label, c.score) for c in result.candidates], result.metric))
    if result.test_scores:
        print("\n" + table(list(result.test_scores.items()), f"{result.metric} (test, not used for the choice)"))
    print(f"selected: {result.best.label} (validation {result.metric} {result.best.score:.4f}, from "
          f"{len(result.candidates)} candidates) -> {result.path}")
    return 0


def _err(line: str) -> None:
    print(line, file=sys.stderr)
