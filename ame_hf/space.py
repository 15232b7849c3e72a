"""The Gradio app of the ame-hf Hugging Face Space: check, merge and push checkpoints in a browser.
Only ame-hf's public API does the work; gradio is imported lazily, since only the Space needs it."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .fetch import format_size
from .output import remove_stale_dirs
from .space_select import (TASK_CHOICES, card_markdown, evaluation_markdown, parse_ingredients, refuse_local_paths,
                           run_evaluate, run_tune)

if TYPE_CHECKING:
    import gradio as gr

    from .records import MergeResult

__all__ = ["MergeView", "build_app", "launch", "one_line", "parse_ingredients", "run_check", "run_merge",
           "run_push"]

TITLE = "ame-hf: merge checkpoints by Amortized Model Ensembling"
INTRO = """\
# ame-hf · Amortized Model Ensembling

Fuse fine-tuned checkpoints of one architecture into one model, **without any data**: AME feeds the
pseudogradients `w − x_i` to a real `torch.optim` optimizer (Lee & Ngo, 2025,
[arXiv:2508.14832](https://arxiv.org/abs/2508.14832)). SGD with the harmonic schedule is exactly the uniform
soup. **Check** reports whether the ingredients can be merged; **Merge** runs
[ame-hf](https://github.com/ame-hf/ame-hf) and shows the model card; **Evaluate** scores models on data you
upload; **Tune** picks the best of the soup, the greedy soup, each ingredient and AME variants on your validation
data; **Push** uploads the latest Merge or Tune result with its card.
"""
# What the data uploads take (`ame_hf.evaluate`'s formats); the suffix decides how a file is read.
DATA_TYPES = [".jsonl", ".json", ".csv", ".txt"]
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Each run's output goes to a new `<tmp>/ame-hf-space-<pid>-*` folder: the pid tells a stale one.
WORK_DIR_PREFIX = "ame-hf-space-"
# Progress callback of `run_merge`: (fraction done, description).
Progress = Callable[[float, str], None]


def on_spaces() -> bool:
    """Whether this process runs on Hugging Face Spaces.

    Returns:
        True when SPACE_ID is set (Spaces sets it).
    """
    return bool(os.environ.get("SPACE_ID"))


def oauth_enabled() -> bool:
    """Whether the app offers "Sign in with Hugging Face".

    SYSTEM=spaces is how gradio itself tells a Space: without it gradio mocks the sign-in with a live
    `whoami` of the local login.

    Returns:
        True on a Space with `hf_oauth: true` in its README (Spaces then sets OAUTH_CLIENT_ID).
    """
    return on_spaces() and os.environ.get("SYSTEM") == "spaces" and bool(os.environ.get("OAUTH_CLIENT_ID"))


def one_line(err: BaseException) -> str:
    """The error as the CLI prints it: one line, whitespace collapsed.

    Args:
        err: any exception.

    Returns:
        Its message on one line (its class name when it has none).

    >>> one_line(ValueError("two\\n   lines"))
    'two lines'
    """
    return " ".join(str(err).split()) or type(err).__name__


def _blank_to_none(value: Any) -> Any:
    """Empty text boxes mean "the default"; anything else goes to `AmeConfig`, which validates it."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value.strip() if isinstance(value, str) else value


def _weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def run_check(ingredients: str | None, dtype: str = "auto", token: str | None = None, *,
              allow_local_paths: bool = True) -> str:
    """The compatibility report of the ingredients, as `ame-hf check` prints it.

    Args:
        ingredients: the form's text, one reference a line.
        dtype: the output dtype to check for (`auto`: the ingredients').
        token: Hub token.
        allow_local_paths: accept local directories (False on a public Space).

    Returns:
        The report's text.

    Raises:
        AmeError: a local path where they are disabled, or a reference that cannot be read.
    """
    import ame_hf

    refs = parse_ingredients(ingredients)
    if not allow_local_paths:
        refuse_local_paths(refs)
    return ame_hf.check(refs, token=token, dtype=dtype or "auto").format()


@dataclass(frozen=True, kw_only=True)
class MergeView:
    """What the app shows after a merge; `folder` (the merge output) is what Push uploads.

    Attributes:
        folder: the merge output.
        card_markdown: its model card, for display.
        config_yaml: its `ame_config.yaml`.
        summary_markdown: the Summary (`summary_markdown`).
    """

    folder: Path
    card_markdown: str
    config_yaml: str
    summary_markdown: str


def run_merge(ingredients: str | None, options: dict[str, Any], work_dir: Path, token: str | None = None, *,
              progress: Progress | None = None, allow_local_paths: bool = True) -> MergeView:
    """Merge with `ame_hf.merge` into `work_dir/merged` and render the card, config and summary.

    Args:
        ingredients: the form's text, one reference a line.
        options: `AmeConfig` fields as the form gives them (`base` included): blank strings mean the default.
        work_dir: an empty folder for the output.
        token: Hub token.
        progress: called with (fraction done, description) as the merge goes.
        allow_local_paths: accept local directories as ingredients, pivot, tokenizer source or base (False
            on a public Space).

    Returns:
        A `MergeView` of the output.

    Raises:
        AmeError: invalid options, a local path where they are disabled, or whatever `merge` refuses.
    """
    import ame_hf

    refs = parse_ingredients(ingredients)
    values = {key: _blank_to_none(value) for key, value in options.items()}
    config = ame_hf.AmeConfig.from_dict({key: value for key, value in values.items() if value is not None})
    if not allow_local_paths:
        base = [config.base] if config.base else []
        refuse_local_paths(refs + config.pivot_refs + config.tokenizer_refs + base)

    def on_bytes(done: int, total: int) -> None:
        if progress is not None and total:
            progress(done / total, f"Merging: {format_size(done)} of {format_size(total)}")

    if progress is not None:
        progress(0.0, "Downloading and checking the ingredients")
    result = ame_hf.merge(refs, work_dir / "merged", config, token=token, progress=False, callback=on_bytes)
    return MergeView(
        folder=result.path,
        card_markdown=card_markdown((result.path / "README.md").read_text(encoding="utf-8")),
        config_yaml=(result.path / "ame_config.yaml").read_text(encoding="utf-8"),
        summary_markdown=summary_markdown(result),
    )


def summary_markdown(result: MergeResult) -> str:
    """The Summary under the Merge tab: what was merged, how, how fast, and each ingredient's commit and size.

    Args:
        result: the merge's record.

    Returns:
        Markdown: a sentence and a table.
    """
    cfg = result.config
    lr = f"relative lr {cfg.relative_lr}" if cfg.relative_lr is not None else f"lr {cfg.lr}"
    out_size = sum(f.stat().st_size for f in result.path.iterdir() if f.is_file())
    lines = [
        (f"Merged **{len(result.ingredients)}** checkpoints with **{cfg.optimizer}** ({lr}, {cfg.schedule} "
         f"schedule, {cfg.epochs} epoch(s)) in **{result.seconds:.1f} s**: {format_size(out_size)} written."),
        "",
        "| # | ingredient | commit sha | weights |",
        "|---|---|---|---|",
    ]
    for i, ing in enumerate(result.ingredients):
        sha = f"`{ing.sha}`" if ing.sha else "local directory"
        lines.append(f"| {i} | {ing.display_name} | {sha} | {format_size(_weights_size(ing.path))} |")
    return "\n".join(lines)


def run_push(folder: str | Path | None, repo_id: str | None, private: bool = False, token: str | None = None) -> str:
    """Upload a merge (or tune) output with its card.

    Args:
        folder: the output of the latest Merge or Tune (None before one).
        repo_id: the target repo.
        private: create the repo private (unticked: the Hub's default, or the existing repo's visibility).
        token: Hub token with write access.

    Returns:
        The repo (or pull request) URL.

    Raises:
        AmeError: nothing to push yet, or what `push_to_hub` refuses.
    """
    import ame_hf

    if not folder or not (Path(folder) / "ame_config.yaml").is_file():
        raise ame_hf.InvalidConfigError("nothing to push yet: run Merge or Tune first")
    # An unticked box leaves the Hub's default (and an existing repo's visibility) alone.
    return ame_hf.push_to_hub(folder, (repo_id or "").strip(), token=token, private=True if private else None)


def _remove_work_dir(folder: str | None) -> None:
    """Delete a session's merge output (`folder` is `<work dir>/merged`)."""
    if folder:
        shutil.rmtree(Path(folder).parent, ignore_errors=True)


def _in_fresh_work_dir(run: Callable[[Path], Any], previous: str | None) -> Any:
    """`run(work_dir)` in a new directory; on success the previous output (`previous`) is deleted.

    A fresh directory per run: a failed merge or tune leaves the previous result (and its Push) intact.
    """
    work_dir = new_work_dir()
    try:
        with _shown_as_gradio_errors():
            view = run(work_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    _remove_work_dir(previous)
    return view


def new_work_dir() -> Path:
    """A new temporary folder for one run's output, named `ame-hf-space-<pid>-*` after this process, which
    removes it when it exits (see `clean_up_work_dirs`).

    Returns:
        The folder (empty).
    """
    _remove_own_work_dirs_at_exit()
    return Path(tempfile.mkdtemp(prefix=f"{WORK_DIR_PREFIX}{os.getpid()}-"))


def clean_up_work_dirs() -> list[Path]:
    """What the app does at start: remove the work folders of Space processes that are gone (a Ctrl-C'd or
    killed app leaves merged models behind, gigabytes with real ones), and have this process remove its own
    when it exits, by Ctrl-C (or SIGTERM, where the app has not set a handler of its own) included.

    Returns:
        The stale folders removed.

    >>> clean_up_work_dirs()  # doctest: +SKIP
    [PosixPath('/tmp/ame-hf-space-4242-k2j3c9')]
    """
    _remove_own_work_dirs_at_exit()
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _remove_own_work_dirs_and_terminate)
    return remove_stale_dirs(Path(tempfile.gettempdir()), WORK_DIR_PREFIX)


@functools.cache
def _remove_own_work_dirs_at_exit() -> None:
    atexit.register(_remove_own_work_dirs)


def _remove_own_work_dirs() -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{WORK_DIR_PREFIX}{os.getpid()}-*"):
        shutil.rmtree(folder, ignore_errors=True)


def _remove_own_work_dirs_and_terminate(signum: int, frame: Any) -> None:
    # Then die of the signal as before: the exit status and any parent's handling stay the same.
    _remove_own_work_dirs()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _import_gradio() -> Any:
    """Import gradio and bind it as this module's `gr`.

    Gradio finds the `gr.OAuthToken` parameter of a handler with `typing.get_type_hints`, which evaluates
    the (postponed, string) annotations in this module's globals, so `gr` must be bound here.
    """
    try:
        import gradio
    except ImportError:
        raise ImportError('the ame-hf Space needs gradio: pip install "gradio[oauth]"') from None
    globals()["gr"] = gradio
    return gradio


@contextmanager
def _shown_as_gradio_errors() -> Iterator[None]:
    """Turn a user mistake (any `AmeError`) into a `gr.Error` with the CLI's one-line message."""
    from .errors import AmeError

    try:
        yield
    except AmeError as err:
        raise gr.Error(one_line(err), print_exception=False) from err


def build_app(*, allow_local_paths: bool | None = None) -> gr.Blocks:
    """The Space's `gr.Blocks`, with API endpoints `check`, `merge`, `evaluate`, `tune` and `push`.

    Building it also cleans up the work folders of earlier app processes that are gone (`clean_up_work_dirs`).

    Args:
        allow_local_paths: accept local directories as ingredients (default: everywhere but on Spaces,
            where visitors must not read the server's disk).

    Returns:
        The app, ready for `.launch()`.

    Raises:
        ImportError: gradio is not installed.

    >>> build_app(allow_local_paths=False).launch()  # doctest: +SKIP
    """
    _import_gradio()
    clean_up_work_dirs()
    handlers = _handlers(not on_spaces() if allow_local_paths is None else allow_local_paths)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        # The latest merge or tune output of this session (what Push uploads); deleted with the session.
        output_folder = gr.State(None, delete_callback=_remove_work_dir)
        with gr.Tabs():
            merge_form = _merge_tab()
            evaluate_form = _evaluate_tab()
            tune_form = _tune_tab()
        push_form = _push_group()
        _connect(handlers, merge_form, evaluate_form, tune_form, push_form, output_folder)
    return demo


def _handlers(local: bool) -> dict[str, Callable[..., Any]]:
    """The app's event handlers by endpoint name: the run functions above, with the form's token (or sign-in) and
    the local-path rule, their errors shown as Gradio errors. Gradio reads their signatures (so they are made
    once gradio is imported): parameter names are the API's; `gr.OAuthToken` and `gr.Progress` parameters are
    filled in by Gradio."""
    from .tuning import DEFAULT_BUDGET

    def check(ingredients: str, dtype: str, token: str, oauth_token: gr.OAuthToken | None = None) -> str:
        with _shown_as_gradio_errors():
            return run_check(ingredients, dtype, _user_token(token, oauth_token), allow_local_paths=local)

    def merge(ingredients: str, optimizer: str, lr: str, relative_lr: str, epochs: float, pivot: str,
              seed: float, shuffle: bool, dtype: str, tokenizer_source: str, token: str, previous: str | None,
              base: str = "", oauth_token: gr.OAuthToken | None = None,
              progress: gr.Progress = gr.Progress()) -> tuple[str, str, str, str]:
        options = {"optimizer": optimizer, "lr": lr, "relative_lr": relative_lr, "epochs": epochs, "pivot": pivot,
                   "seed": seed, "shuffle": bool(shuffle), "dtype": dtype, "tokenizer_source": tokenizer_source,
                   "base": base}
        view = _in_fresh_work_dir(lambda work_dir: run_merge(
            ingredients, options, work_dir, _user_token(token, oauth_token),
            progress=lambda fraction, desc: progress(fraction, desc=desc), allow_local_paths=local), previous)
        return view.card_markdown, view.config_yaml, view.summary_markdown, str(view.folder)

    # Defaults of None make the uploads optional for gradio_client too (it then gets the one-line error).
    def evaluate(models: str, data: str | None = None, task: str = "auto", metric: str = "",
                 max_length: float | None = None, token: str = "", base: str = "",
                 oauth_token: gr.OAuthToken | None = None) -> str:
        with _shown_as_gradio_errors():
            result = run_evaluate(models, data, task, metric, max_length, _user_token(token, oauth_token), base=base,
                                  allow_local_paths=local)
        return evaluation_markdown(result)

    def tune(ingredients: str, data: str | None = None, test_data: str | None = None, task: str = "auto",
             metric: str = "", budget: float | None = DEFAULT_BUDGET, max_length: float | None = None, token: str = "",
             previous: str | None = None, base: str = "", oauth_token: gr.OAuthToken | None = None,
             progress: gr.Progress = gr.Progress()) -> tuple[str, str, str, str, str]:
        view = _in_fresh_work_dir(lambda work_dir: run_tune(
            ingredients, data, test_data, work_dir, _user_token(token, oauth_token), task=task, metric=metric,
            budget=budget, max_length=max_length, base=base, progress=lambda fraction, desc: progress(fraction, desc=desc),
            allow_local_paths=local), previous)
        return view.summary_markdown, view.candidates_markdown, view.card_markdown, view.config_yaml, str(view.folder)

    def push(repo_id: str, private: bool, token: str, folder: str | None,
             oauth_token: gr.OAuthToken | None = None) -> str:
        secret = _user_token(token, oauth_token)
        if secret is None and on_spaces():
            # Never fall back to a token of the Space itself: visitors push with their own.
            raise gr.Error("sign in with Hugging Face or paste a token with write access to push",
                           print_exception=False)
        with _shown_as_gradio_errors():
            url = run_push(folder, repo_id, bool(private), secret)
        return f"Pushed to [{url}]({url})"

    return {"check": check, "merge": merge, "evaluate": evaluate, "tune": tune, "push": push}


def _user_token(token: str | None, oauth_token: gr.OAuthToken | None) -> str | None:
    # The pasted token wins over the sign-in; neither is ever shown, logged or stored.
    return (token or "").strip() or (oauth_token.token if oauth_token is not None else None)


def _merge_tab() -> dict[str, Any]:
    """The Merge tab: ingredients, Check and Merge, the AME options, the result. Returns its components by name."""
    from .config import DEFAULT_OPTIMIZER, OUTPUT_DTYPES, PIVOT_WORDS, SOURCE_WORDS
    from .optimizers import OPTIMIZERS

    with gr.Tab("Merge", id="merge-tab"):
        with gr.Row():
            with gr.Column(scale=3):
                ingredients = gr.Textbox(
                    "", label="Ingredients", lines=4, elem_id="ingredients",
                    placeholder="org/finetune-a\norg/finetune-b@v1\norg/finetune-c",
                    info="Hub repo IDs, one a line; `@revision` (branch, tag or commit) is allowed",
                )
                with gr.Row():
                    check_button = gr.Button("Check", elem_id="check-button")
                    merge_button = gr.Button("Merge", variant="primary", elem_id="merge-button")
                report = gr.Textbox(label="Compatibility report", lines=3, interactive=False, elem_id="report")
            with gr.Column(scale=2):
                optimizer = gr.Dropdown(sorted(OPTIMIZERS), value=DEFAULT_OPTIMIZER, label="Optimizer",
                                        elem_id="optimizer")
                with gr.Row():
                    lr = gr.Textbox("", label="lr", placeholder="default", info="blank = default", elem_id="lr")
                    relative_lr = gr.Textbox("", label="Relative lr", placeholder="default",
                                             info="× RMS(ingredient − pivot)", elem_id="relative-lr")
                with gr.Row():
                    epochs = gr.Number(1, label="Epochs", precision=0, minimum=1, elem_id="epochs")
                    pivot = gr.Dropdown(list(PIVOT_WORDS), value="mean", label="Pivot", allow_custom_value=True,
                                        info="mean, first, an index, or a repo ID", elem_id="pivot")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="seed")
                    shuffle = gr.Checkbox(False, label="Shuffle every epoch", elem_id="shuffle")
                with gr.Row():
                    dtype = gr.Dropdown(list(OUTPUT_DTYPES), value="auto", label="Output dtype", elem_id="dtype")
                    tokenizer_source = gr.Dropdown(list(SOURCE_WORDS), value="auto", label="Tokenizer source",
                                                   allow_custom_value=True, elem_id="tokenizer-source",
                                                   info="tokenizer + chat template: pivot, first, an index, a repo ID")
                base = _base_box("merge")
        summary = gr.Markdown(label="Summary", elem_id="summary")
        card, config_yaml = _result_tabs("card", "config")
    return {"ingredients": ingredients, "check_button": check_button, "merge_button": merge_button, "report": report,
            "optimizer": optimizer, "lr": lr, "relative_lr": relative_lr, "epochs": epochs, "pivot": pivot,
            "seed": seed, "shuffle": shuffle, "dtype": dtype, "tokenizer_source": tokenizer_source, "base": base,
            "summary": summary, "card": card, "config_yaml": config_yaml}


def _evaluate_tab() -> dict[str, Any]:
    """The Evaluate tab: models, data, task options, the scores. Returns its components by name."""
    with gr.Tab("Evaluate", id="evaluate-tab"):
        models = gr.Textbox("", label="Models", lines=4, elem_id="eval-models",
                            placeholder="your-name/merged-model\norg/finetune-a",
                            info="Hub repo IDs, one a line, scored in one table")
        with gr.Row():
            data = gr.File(label="Data", file_types=DATA_TYPES, elem_id="eval-data")
            task, metric, max_length = _selection_options("eval")
        base = _base_box("eval")
        evaluate_button = gr.Button("Evaluate", variant="primary", elem_id="evaluate-button")
        scores = gr.Markdown(label="Scores", elem_id="scores")
    return {"models": models, "data": data, "task": task, "metric": metric, "max_length": max_length, "base": base,
            "evaluate_button": evaluate_button, "scores": scores}


def _tune_tab() -> dict[str, Any]:
    """The Tune tab: ingredients, validation and test data, options, the choice. Returns its components by name."""
    from .tuning import DEFAULT_BUDGET

    with gr.Tab("Tune", id="tune-tab"):
        ingredients = gr.Textbox("", label="Ingredients", lines=4, elem_id="tune-ingredients",
                                 placeholder="org/finetune-a\norg/finetune-b\norg/finetune-c",
                                 info="Hub repo IDs, one a line; Push uploads the selected model")
        with gr.Row():
            data = gr.File(label="Validation data (the choice)", file_types=DATA_TYPES, elem_id="tune-data")
            test_data = gr.File(label="Test data (optional, not used to choose)", file_types=DATA_TYPES,
                                elem_id="tune-test-data")
        with gr.Row():
            task, metric, max_length = _selection_options("tune")
            budget = gr.Number(DEFAULT_BUDGET, label="Budget", precision=0, minimum=0, elem_id="budget",
                               info="AME variants to try, besides soup, greedy soup and ingredients")
        base = _base_box("tune")
        tune_button = gr.Button("Tune", variant="primary", elem_id="tune-button")
        summary = gr.Markdown(label="Selected", elem_id="tune-summary")
        with gr.Tab("Candidates"):
            candidates = gr.Markdown(label="Candidates", elem_id="candidates")
        card, config_yaml = _result_tabs("tune-card", "tune-config")
    return {"ingredients": ingredients, "data": data, "test_data": test_data, "task": task, "metric": metric,
            "max_length": max_length, "budget": budget, "base": base, "tune_button": tune_button, "summary": summary,
            "candidates": candidates, "card": card, "config_yaml": config_yaml}


def _push_group() -> dict[str, Any]:
    """Push, below the tabs: target repo, visibility, the token box (every tab's), sign-in on a Space with OAuth.
    Returns its components by name."""
    with gr.Group():
        gr.Markdown("### Push to the Hub\nUploads the latest Merge or Tune result with its model card.")
        with gr.Row():
            repo_id = gr.Textbox("", label="Target repo ID", placeholder="your-name/merged-model", elem_id="repo-id")
            private = gr.Checkbox(False, label="Private", elem_id="private")
            token = gr.Textbox("", label="Hugging Face token", type="password", elem_id="token",
                               info="write access to push; also reads private ingredients; never stored")
            if oauth_enabled():
                # Only there: off Spaces the button asks the Hub who is logged in at start-up (and fails
                # offline), and on a Space without OAuth gradio refuses to start with it.
                gr.LoginButton(elem_id="login")
        push_button = gr.Button("Push", elem_id="push-button")
        status = gr.Markdown(label="Push status", elem_id="push-status")
    return {"repo_id": repo_id, "private": private, "token": token, "push_button": push_button, "status": status}


def _connect(handlers: dict[str, Callable[..., Any]], merge: dict[str, Any], evaluate: dict[str, Any],
             tune: dict[str, Any], push: dict[str, Any], output_folder: gr.State) -> None:
    """Wire the buttons to the handlers; the API endpoints take the inputs in these orders."""
    token = push["token"]
    merge["check_button"].click(handlers["check"], [merge["ingredients"], merge["dtype"], token], merge["report"],
                                api_name="check")
    merge["merge_button"].click(
        handlers["merge"],
        [merge[name] for name in ("ingredients", "optimizer", "lr", "relative_lr", "epochs", "pivot", "seed", "shuffle",
                                  "dtype", "tokenizer_source")] + [token, output_folder, merge["base"]],
        [merge["card"], merge["config_yaml"], merge["summary"], output_folder], api_name="merge",
    )
    evaluate["evaluate_button"].click(
        handlers["evaluate"],
        [evaluate[name] for name in ("models", "data", "task", "metric", "max_length")] + [token, evaluate["base"]],
        evaluate["scores"], api_name="evaluate")
    tune["tune_button"].click(
        handlers["tune"],
        [tune[name] for name in ("ingredients", "data", "test_data", "task", "metric", "budget", "max_length")]
        + [token, output_folder, tune["base"]],
        [tune["summary"], tune["candidates"], tune["card"], tune["config_yaml"], output_folder], api_name="tune",
    )
    push["push_button"].click(handlers["push"], [push["repo_id"], push["private"], token, output_folder],
                              push["status"], api_name="push")


def _result_tabs(card_id: str, config_id: str) -> tuple[gr.Markdown, gr.Code]:
    """A result's model card and `ame_config.yaml`, a tab each."""
    with gr.Tab("Model card"):
        card = gr.Markdown(label="Model card", elem_id=card_id, container=True, min_height=80, max_height=520)
    with gr.Tab("ame_config.yaml"):
        config = gr.Code(language="yaml", label="ame_config.yaml", interactive=False, max_lines=24, elem_id=config_id)
    return card, config


def _base_box(prefix: str) -> gr.Textbox:
    return gr.Textbox("", label="Base model (for LoRA adapters)", placeholder="org/base-model",
                      info="blank: each adapter's own base_model_name_or_path", elem_id=f"{prefix}-base")


def _selection_options(prefix: str) -> tuple[gr.Dropdown, gr.Textbox, gr.Number]:
    """Task, metric and max length: what `evaluate` and `tune` share."""
    with gr.Column():
        task = gr.Dropdown(list(TASK_CHOICES), value="auto", label="Task", elem_id=f"{prefix}-task",
                           info="auto: from the models' architecture")
        metric = gr.Textbox("", label="Metric", placeholder="default", elem_id=f"{prefix}-metric",
                            info="blank: accuracy; loss for text-generation; or macro_f1, perplexity")
        # 0, not None: a browser shows and sends an empty number box as 0.
        max_length = gr.Number(0, label="Max length", precision=0, minimum=0, elem_id=f"{prefix}-max-length",
                               info="text-generation: tokens per document; 0: the model's limit")
    return task, metric, max_length


def launch(port: int | None = None, **kwargs: Any) -> None:
    """Serve the app (`ame-hf space`), without Gradio's run history (it would keep the token box).

    Args:
        port: the server port (default: Gradio's).
        kwargs: passed on to `gr.Blocks.launch`.
    """
    # The run history would keep every input, the token included, in the browser (or a bucket).
    kwargs.setdefault("run_history", False)
    build_app().launch(server_port=port, **kwargs)
