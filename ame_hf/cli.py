"""The `ame-hf` command line: argument parsing and printing only, over the Python API.

Each command first checks its options in one step (`_options`, before torch or the Hub client loads): a
usage error is one line naming the flag, exit 2. Any other `AmeError` is one line, exit 1. `--debug` shows
the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

# Only modules that import neither torch nor transformers load here (errors must be instant, README
# "Failure behaviour"); the commands import the heavy ones (merging, api, tune, ...) when they run.
from . import __version__
from ._cli_errors import as_flags, error_line, one_line
from ._cli_options import (REF_HELP, add_common, add_config_options, add_token, command_parser, config_values,
                           version_text, whole)
from ._options import check_options, config_with, merge_options
from .cli_eval import (add_evaluate_parser, add_merge_options, add_tune_parser, check_before_merge, evaluate_merge,
                       merge_greedy, validate_merge_evaluation)
from .config import CHECK_FIELDS, OUTPUT_FIELDS, WEIGHT_FIELDS, AmeConfig
from .errors import AmeError, InvalidConfigError
from .output import check_output_dir
from .push import upload_output
from .recipe import read_recipe
from .resolve import local_inputs

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """Import a command's heavy modules (torch, the Hub client, transformers) with Python's cyclic garbage collector
    paused, then freeze what they made, so that no later collection walks it again.

    Importing them ran three full collections over a growing heap, and every later full one walked the objects
    they leave behind (about 170 thousand) again: a 4 x 134M default merge's process spent 0.15 s in collections
    at 88ed758 and 0.01 s with this (`benchmarks/where_time_goes.py`, its garbage collection row). Module objects
    live as long as the process, so freezing frees nothing that would have been freed (about 7 thousand cyclic
    objects of the imports, 1 MiB, are kept); the collector runs as before on what the command makes.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


class UsageError(Exception):
    """A malformed command line (unknown option, bad option value): one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line naming it, not a usage block (main() prints it)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see `{self.prog} --help`")


class _Version(argparse.Action):
    """`--version`: one line per package, as written (argparse's own action rewraps it into one paragraph)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: str | None = None) -> None:
        print(version_text(__version__))
        parser.exit()


class _Deprecated(argparse.Action):
    """An old spelling of an option that still works, and says which to use."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: str | None = None) -> None:
        print(f"ame-hf: warning: {option} is deprecated here, use {self.metavar_for}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_push(p: Any, required: bool, *, branch_flag: str = "--revision") -> None:
    p.add_argument("--repo-id", required=required, metavar="ORG/NAME", help="target repo")
    p.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    p.add_argument(branch_flag, dest="revision", default=None, metavar="BRANCH",
                   help="branch to push to (created if missing; default: main)")
    if branch_flag != "--revision":  # merge's --revision read as the ingredients' revision: kept, deprecated
        old = p.add_argument("--revision", dest="revision", action=_Deprecated, help=argparse.SUPPRESS)
        old.metavar_for = branch_flag
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", default=None, metavar="TEXT", help="commit message")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ame-hf",
        description="Fuse fine-tuned checkpoints into one model by Amortized Model Ensembling (AME).",
        epilog="Run `ame-hf COMMAND --help` for a command's options and examples; `ame-hf demo` to try it.",
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="ame-hf's version and those of torch, transformers, huggingface_hub, ...")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    m = command_parser(sub, "merge", help="merge checkpoints with AME",
                       description="Merge checkpoints (local folders, Hub repo IDs or PEFT LoRA adapters) with AME "
                                   "into one from_pretrained-loadable model.",
                       examples=["ame-hf merge ./ft-a ./ft-b ./ft-c -o merged            # the default AME",
                                 "ame-hf merge org/a org/b@v1 -o soup --optimizer sgd   # the exact uniform soup",
                                 "ame-hf merge ./a ./b -o m --optimizer adamw --lr 1e-4 --shuffle --epochs 3",
                                 "ame-hf merge ./lora-a ./lora-b -o m --base org/base --pivot base",
                                 "ame-hf merge org/a org/b -o m --push --repo-id me/merged --private",
                                 "ame-hf merge --config merged/ame_config.yaml -o again   # the same bytes"])
    g = m.add_argument_group("ingredients and AME")
    g.add_argument("refs", nargs="*", metavar="REF", help="ingredient: " + REF_HELP)
    g.add_argument("--config", metavar="FILE", help="YAML file with the same options (e.g. a previous ame_config.yaml)")
    add_config_options(g, only=WEIGHT_FIELDS + ("base",))
    g = m.add_argument_group("output")
    g.add_argument("-o", "--out", metavar="DIR",
                   help="output folder: new or empty (with --overwrite: a previous ame-hf output)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a previous ame-hf output at --out (never an input, the cwd or a folder of yours)")
    g.add_argument("--resume", action="store_true",
                   help="continue the unfinished merge of --out that the same command started (kill -9, power loss, "
                        "full disk): finished tensors are verified and kept; if there is none, start from the beginning")
    add_config_options(g, only=[f for f in OUTPUT_FIELDS if f != "base"])
    g = m.add_argument_group("Hub and push")
    g.add_argument("--push", action="store_true", help="push the output to the Hub (needs --repo-id)")
    _add_push(g, required=False, branch_flag="--push-branch")
    add_token(g)
    g = m.add_argument_group("devices")
    g.add_argument("--device", help="compute device, e.g. cpu, cuda, cuda:1 (default: chosen by accelerate)")
    g.add_argument("--max-memory", metavar="SIZE",
                   help="memory for one tensor's ingredient blocks, so each input byte is read once (default "
                        "128MiB; a larger tensor keeps its first blocks that fit and reads the rest again)")
    g.add_argument("--threads", type=whole, metavar="N", help="torch threads on the CPU (default 1; for more cores "
                                                             "run several processes with torchrun)")
    add_merge_options(m.add_argument_group("evaluation (validation data)"))
    add_common(m)
    m.set_defaults(func=cmd_merge, validate=validate_merge)

    c = command_parser(sub, "check", help="report whether checkpoints can be merged (exit 0) or not (exit 1)",
                       description="Check checkpoints as `merge` with the same options would, reading only their "
                                   "configs, tokenizers and safetensors headers (no weight is downloaded).",
                       examples=["ame-hf check org/a org/b", "ame-hf check ./ft-a ./ft-b --pivot org/base",
                                 "ame-hf check ./lora-a ./lora-b --base org/base --json",
                                 "ame-hf check org/a org/b --tokenizer-source union --verbose"])
    c.add_argument("refs", nargs="+", metavar="REF", help="ingredient: " + REF_HELP)
    add_config_options(c, only=CHECK_FIELDS)  # the options that change what is checked, as merge means them
    c.add_argument("--json", action="store_true", help="print the report as JSON (every error and note)")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="every error and note (default: what decides first, the rest counted)")
    add_token(c)
    add_common(c)
    c.set_defaults(func=cmd_check, validate=validate_check)

    p = command_parser(sub, "push", help="push an existing merge output to the Hub",
                       description="Upload a merge output folder (weights, config, tokenizer, card) to a Hub repo.",
                       examples=["ame-hf push merged --repo-id me/merged --private",
                                 "ame-hf push merged --repo-id me/merged --create-pr --commit-message 'try Adam'"])
    p.add_argument("dir", metavar="DIR", help="a merge output folder")
    _add_push(p, required=True)
    add_token(p)
    add_common(p)
    p.set_defaults(func=cmd_push)

    add_evaluate_parser(sub)
    add_tune_parser(sub)

    s = sub.add_parser("space", help="run the Gradio app (the Hugging Face Space) locally")
    s.add_argument("--port", type=whole, default=None, help="port (default: Gradio's 7860 or GRADIO_SERVER_PORT)")
    add_common(s)
    s.set_defaults(func=cmd_space)

    d = sub.add_parser("demo", help="build tiny fine-tunes locally, merge them (AME and soup) and compare")
    d.add_argument("--out", default="ame-demo", help="working directory (default ./ame-demo)")
    d.add_argument("--steps", type=whole, default=None, help="fine-tuning steps per expert (default 120)")
    add_common(d)
    d.set_defaults(func=cmd_demo)
    return parser


@dataclasses.dataclass(frozen=True, kw_only=True)
class MergeRun:
    """What `ame-hf merge` was asked, validated: the ingredients, `--out` and the config."""

    refs: list[str]
    out: str
    config: AmeConfig


def validate_merge(args: argparse.Namespace) -> MergeRun:
    """`merge`'s options, from `--config` YAML overridden by explicit flags. Imports no torch.

    Raises:
        InvalidConfigError: a usage error (exit 2).
    """
    refs, out, values = list(args.refs), args.out, {}
    if args.config:
        recipe = read_recipe(args.config)
        refs, out, values = refs or recipe.refs, out or recipe.out, dict(recipe.values)
    values.update(config_values(args))
    if not refs:
        raise InvalidConfigError("no ingredients: give REF arguments or an `ingredients:` list in --config")
    if not out:
        raise InvalidConfigError("no output directory: pass --out DIR")
    if args.push and not args.repo_id:
        raise InvalidConfigError("--push needs --repo-id ORG/NAME")
    if args.resume and args.greedy_soup:
        raise InvalidConfigError("--resume continues a plain merge; --greedy-soup runs its merges again: drop --resume")
    config = config_with(None, values)
    merge_options(refs, config, threads=args.threads, max_memory=args.max_memory)
    validate_merge_evaluation(args, values)
    return MergeRun(refs=refs, out=str(out), config=config)


def cmd_merge(args: argparse.Namespace, run: MergeRun) -> int:
    refs, out = run.refs, run.out
    # Before torch and the Hub client load: a bad path or --out fails in a fraction of a second.
    check_output_dir(Path(out), args.overwrite, inputs=local_inputs([*refs, *run.config.other_refs]),
                     resume=args.resume)
    with imports_without_gc():  # what the check and the merge import: torch, the Hub client, transformers
        stage = check_before_merge(args, refs, run.config)
        from .devices import keep_freed_memory
        from .merging import merge

    keep_freed_memory()
    if args.greedy_soup:
        folder = merge_greedy(args, refs, out, run.config)
        if args.push:
            _push(folder, args)
        return 0
    result = merge(refs, out, run.config, token=args.token, overwrite=args.overwrite, resume=args.resume,
                   progress=not args.quiet, device=args.device, threads=args.threads,
                   max_memory=args.max_memory, stage=stage)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch: the main process reports
        return 0
    _say(args, f"merged {len(result.ingredients)} checkpoints with {result.config.optimizer} "
               f"in {result.seconds:.1f}s -> {result.path}")
    if args.data:
        evaluate_merge(args, result)
    if args.push:
        _push(result.path, args)
    return 0


def validate_check(args: argparse.Namespace) -> dict[str, Any]:
    """`check`'s keyword arguments of `ame_hf.check`. Imports no torch.

    Raises:
        InvalidConfigError: a usage error (exit 2).
    """
    options = config_values(args)
    check_options(args.refs, **options)
    return options


def cmd_check(args: argparse.Namespace, options: dict[str, Any]) -> int:
    local_inputs([*args.refs, *check_options(args.refs, **options).other_refs])  # a typo fails before torch
    from .api import check

    report = check(args.refs, token=args.token, **options)
    # The report is the Python API's: its lines write a keyword as a caller passes it (`base=REF`).
    keywords = [k for k in inspect.signature(check).parameters if k != "ingredients"]
    print(json.dumps(report.to_dict(), indent=2) if args.json
          else as_flags(report.format(verbose=args.verbose), keywords, "check", marked_only=True))
    return 0 if report.mergeable else EXIT_ERROR


def cmd_push(args: argparse.Namespace, options: None) -> int:
    _push(Path(args.dir), args)
    return 0


def _push(folder: Path, args: argparse.Namespace) -> None:

    info = upload_output(folder, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                         create_pr=args.create_pr, commit_message=args.commit_message)
    if info.changed:
        print(f"pushed to {info.url}")
    else:
        print(f"nothing changed: {args.repo_id} already holds exactly this output (commit {info.commit}); {info.url}")


def cmd_space(args: argparse.Namespace, options: None) -> int:
    from .space import launch

    try:
        import gradio  # noqa: F401  (only the Space needs it)
    except ImportError as err:
        raise InvalidConfigError(f"the Space needs gradio ({err}); install it with "
                                 "`pip install \"gradio[oauth]==6.31.0\"`") from err
    launch(port=args.port)
    return 0


def cmd_demo(args: argparse.Namespace, options: None) -> int:
    from .demo import format_table, next_commands, run_demo

    kwargs = {"steps": args.steps} if args.steps else {}
    rows = run_demo(args.out, progress=not args.quiet, log=None if args.quiet else print, **kwargs)
    print(format_table(rows))
    print("\ntry next:")
    for command in next_commands(args.out):
        print(f"  {command}")
    return 0


def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


@contextlib.contextmanager
def _cli_logging(args: argparse.Namespace) -> Iterator[None]:
    # Our own handler on the package logger for the length of one main() call: the CLI prints
    # ame-hf's warnings and info whatever the root logger is configured to, and a caller of main()
    # (a script, a test) gets its logging and progress-bar settings back afterwards.
    quiet = getattr(args, "quiet", False)
    logger = logging.getLogger("ame_hf")
    saved = (logger.propagate, logger.level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    bars_were_disabled = True
    if quiet:  # huggingface_hub only here: a usage error must stay instant (no heavy import)
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        bars_were_disabled = are_progress_bars_disabled()
        disable_progress_bars()
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, level = saved
        logger.setLevel(level)
        if not bars_were_disabled:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        print(f"ame-hf: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    validate: Callable[[argparse.Namespace], Any] = getattr(args, "validate", lambda args: None)
    try:
        options = validate(args)  # the one validation step: before torch, the Hub client or any work
    except InvalidConfigError as err:
        if args.debug:
            raise
        print(f"ame-hf: error: {error_line(err, args.command)}", file=sys.stderr)
        return EXIT_USAGE
    func: Callable[[argparse.Namespace, Any], int] = args.func
    try:
        with _cli_logging(args):
            return func(args, options)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("ame-hf: interrupted; nothing was written to the output", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if args.debug:
            raise
        if isinstance(err, AmeError):
            print(f"ame-hf: error: {error_line(err, args.command)}", file=sys.stderr)
        else:
            print(f"ame-hf: unexpected error: {type(err).__name__}: {one_line(err)} "
                  "(run again with --debug for the traceback, and please report it)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
