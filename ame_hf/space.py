"""The Gradio app of the ame-hf Hugging Face Space: check, merge and push checkpoints in a browser.
Only ame-hf's public API does the work; gradio is imported lazily, since only the Space needs it."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ._model_files import project_url
from ._space_forms import (adapter_options, base_box, eval_batch_box, lm_eval_options, merge_advanced, output_advanced,
                           push_advanced, result_tabs, selection_options)
from ._space_lm_eval import LM_EVAL_KEYS
from .output import clean_up_temp_dirs, process_temp_dir
from .space_merge import MergeView, one_line, run_check, run_merge, run_push
from .space_select import evaluation_markdown, parse_ingredients, run_evaluate, run_tune

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["MergeView", "build_app", "launch", "one_line", "parse_ingredients", "run_check", "run_merge",
           "run_push"]

TITLE = "ame-hf: merge checkpoints by Amortized Model Ensembling"
INTRO = """\
# ame-hf · Amortized Model Ensembling

Fuse fine-tuned checkpoints of one architecture into one model, **without any data**: AME feeds the
pseudogradients `w − x_i` to a real `torch.optim` optimizer (Lee & Ngo, 2025,
[arXiv:2508.14832](https://arxiv.org/abs/2508.14832)). SGD with the harmonic schedule is exactly the uniform
soup. **Check** reports whether the ingredients can be merged; **Merge** runs
[ame-hf]({url}) and shows the model card; **Evaluate** scores models on data you
upload; **Tune** picks the best of the soup, the greedy soup, each ingredient and AME variants on your validation
data; **Push** uploads the latest Merge or Tune result with its card.
"""
# What the data uploads take (`ame_hf.evaluate`'s formats); the suffix decides how a file is read.
DATA_TYPES = [".jsonl", ".json", ".csv", ".txt"]
# Each run's output goes to a new `<tmp>/ame-hf-space-<pid>-*` folder, removed when the app exits; the pid tells
# one a killed app left behind.
WORK_DIR_PREFIX = "ame-hf-space-"


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


def _remove_work_dir(folder: str | None) -> None:
    """Delete a session's merge output (`folder` is `<work dir>/merged`)."""
    if folder:
        shutil.rmtree(Path(folder).parent, ignore_errors=True)


def _in_fresh_work_dir(run: Callable[[Path], Any], previous: str | None) -> Any:
    """`run(work_dir)` in a new directory; on success the previous output (`previous`) is deleted.

    A fresh directory per run: a failed merge or tune leaves the previous result (and its Push) intact.
    """
    work_dir = process_temp_dir(WORK_DIR_PREFIX)
    try:
        with _shown_as_gradio_errors():
            view = run(work_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    _remove_work_dir(previous)
    return view


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
    """Turn a user mistake (any `AmeError`) into a `gr.Error` with its one-line message, as the Python API words
    it (the keywords it names as a caller passes them, `token=TOKEN`; the CLI shows them as flags)."""
    from .errors import AmeError

    try:
        yield
    except AmeError as err:
        raise gr.Error(one_line(err), print_exception=False) from err


def build_app(*, allow_local_paths: bool | None = None) -> gr.Blocks:
    """The Space's `gr.Blocks`, with API endpoints `check`, `merge`, `evaluate`, `tune` and `push`.

    Building it removes the work folders of earlier app processes that are gone (`output.clean_up_temp_dirs`).

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
    clean_up_temp_dirs(WORK_DIR_PREFIX)
    handlers = _handlers(not on_spaces() if allow_local_paths is None else allow_local_paths)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(INTRO.format(url=project_url()))
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

    # Parameters after the first ones have defaults: API callers that predate them keep working.
    def check(ingredients: str, dtype: str, token: str, pivot: str = "mean", base: str = "", variant: str = "",
              tokenizer_source: str = "auto", oauth_token: gr.OAuthToken | None = None) -> str:
        options = {"pivot": pivot, "base": base, "variant": variant, "tokenizer_source": tokenizer_source}
        with _shown_as_gradio_errors():
            return run_check(ingredients, dtype, _user_token(token, oauth_token), options=options,
                             allow_local_paths=local)

    def merge(ingredients: str, optimizer: str, lr: str, relative_lr: str, epochs: float, pivot: str,
              seed: float, shuffle: bool, dtype: str, tokenizer_source: str, token: str, previous: str | None,
              base: str = "", optimizer_args: str = "", schedule: str = "", batch_size: float = 1, order: str = "given",
              compute_dtype: str = "float32", max_shard_size: str = "", allow_nonfinite: bool = False,
              variant: str = "", save_as: str = "model", adapter_rank: float | None = 0, adapter_energy: str = "",
              weights: str = "", transform: str = "none", density: str = "", gamma: str = "", rescale: str = "",
              disjoint_sum: bool = False, oauth_token: gr.OAuthToken | None = None,
              progress: gr.Progress = gr.Progress()) -> tuple[str, str, str, str]:
        options = {"optimizer": optimizer, "lr": lr, "relative_lr": relative_lr, "epochs": epochs, "pivot": pivot,
                   "seed": seed, "shuffle": bool(shuffle), "dtype": dtype, "tokenizer_source": tokenizer_source,
                   "base": base, "optimizer_args": optimizer_args, "schedule": schedule, "batch_size": batch_size,
                   "order": order, "compute_dtype": compute_dtype, "max_shard_size": max_shard_size,
                   "allow_nonfinite": bool(allow_nonfinite), "variant": variant,
                   **adapter_options(save_as, adapter_rank, adapter_energy), "weights": weights,
                   "transform": transform, "density": density, "gamma": gamma, "rescale": rescale,
                   "disjoint_sum": bool(disjoint_sum)}
        view = _in_fresh_work_dir(lambda work_dir: run_merge(
            ingredients, options, work_dir, _user_token(token, oauth_token),
            progress=lambda fraction, desc: progress(fraction, desc=desc), allow_local_paths=local), previous)
        return view.card_markdown, view.config_yaml, view.summary_markdown, str(view.folder)

    # Defaults of None make the uploads optional for gradio_client too (it then gets the one-line error).
    def evaluate(models: str, data: str | None = None, task: str = "auto", metric: str = "",
                 max_length: float | None = None, token: str = "", base: str = "", batch_size: float | None = 0,
                 lm_eval_tasks: str = "", lm_eval_include: str = "", lm_eval_metric: str = "",
                 lm_eval_limit: float | None = 0, lm_eval_num_fewshot: str = "",
                 oauth_token: gr.OAuthToken | None = None) -> str:
        lm_eval = dict(zip(LM_EVAL_KEYS, (lm_eval_tasks, lm_eval_include, lm_eval_metric, lm_eval_limit,
                                          lm_eval_num_fewshot)))
        with _shown_as_gradio_errors():
            result = run_evaluate(models, data, task, metric, max_length, _user_token(token, oauth_token), base=base,
                                  batch_size=batch_size, lm_eval=lm_eval, allow_local_paths=local)
        return evaluation_markdown(result)

    def tune(ingredients: str, data: str | None = None, test_data: str | None = None, task: str = "auto",
             metric: str = "", budget: float | None = DEFAULT_BUDGET, max_length: float | None = None, token: str = "",
             previous: str | None = None, base: str = "", batch_size: float | None = 0, dtype: str = "auto",
             tokenizer_source: str = "auto", compute_dtype: str = "float32", max_shard_size: str = "",
             allow_nonfinite: bool = False, variant: str = "", save_as: str = "model", adapter_rank: float | None = 0,
             adapter_energy: str = "", lm_eval_tasks: str = "", lm_eval_include: str = "", lm_eval_metric: str = "",
             lm_eval_limit: float | None = 0, lm_eval_num_fewshot: str = "", oauth_token: gr.OAuthToken | None = None,
             progress: gr.Progress = gr.Progress()) -> tuple[str, str, str, str, str]:
        lm_eval = dict(zip(LM_EVAL_KEYS, (lm_eval_tasks, lm_eval_include, lm_eval_metric, lm_eval_limit,
                                          lm_eval_num_fewshot)))
        options = {"dtype": dtype, "tokenizer_source": tokenizer_source, "compute_dtype": compute_dtype,
                   "max_shard_size": max_shard_size, "allow_nonfinite": bool(allow_nonfinite), "variant": variant,
                   **adapter_options(save_as, adapter_rank, adapter_energy)}
        view = _in_fresh_work_dir(lambda work_dir: run_tune(
            ingredients, data, test_data, work_dir, _user_token(token, oauth_token), task=task, metric=metric,
            budget=budget, max_length=max_length, base=base, batch_size=batch_size, options=options,
            progress=lambda fraction, desc: progress(fraction, desc=desc), lm_eval=lm_eval, allow_local_paths=local),
            previous)
        return view.summary_markdown, view.candidates_markdown, view.card_markdown, view.config_yaml, str(view.folder)

    def push(repo_id: str, private: bool, token: str, folder: str | None, revision: str = "", create_pr: bool = False,
             commit_message: str = "", oauth_token: gr.OAuthToken | None = None) -> str:
        secret = _user_token(token, oauth_token)
        if secret is None and on_spaces():
            # Never fall back to a token of the Space itself: visitors push with their own.
            raise gr.Error("sign in with Hugging Face or paste a token with write access to push",
                           print_exception=False)
        with _shown_as_gradio_errors():
            url = run_push(folder, repo_id, bool(private), secret, revision=revision, create_pr=bool(create_pr),
                           commit_message=commit_message)
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
                base = base_box("merge")
                advanced = merge_advanced()
        summary = gr.Markdown(label="Summary", elem_id="summary")
        card, config_yaml = result_tabs("card", "config")
    return {"ingredients": ingredients, "check_button": check_button, "merge_button": merge_button, "report": report,
            "optimizer": optimizer, "lr": lr, "relative_lr": relative_lr, "epochs": epochs, "pivot": pivot,
            "seed": seed, "shuffle": shuffle, "dtype": dtype, "tokenizer_source": tokenizer_source, "base": base,
            "summary": summary, "card": card, "config_yaml": config_yaml, "advanced": advanced}


def _evaluate_tab() -> dict[str, Any]:
    """The Evaluate tab: models, data, task options, the scores. Returns its components by name."""
    with gr.Tab("Evaluate", id="evaluate-tab"):
        models = gr.Textbox("", label="Models", lines=4, elem_id="eval-models",
                            placeholder="your-name/merged-model\norg/finetune-a",
                            info="Hub repo IDs, one a line, scored in one table")
        with gr.Row():
            data = gr.File(label="Data", file_types=DATA_TYPES, elem_id="eval-data")
            task, metric, max_length = selection_options("eval")
        base = base_box("eval")
        lm_eval = lm_eval_options("eval")
        with gr.Accordion("Advanced options", open=False, elem_id="eval-advanced"):
            batch_size = eval_batch_box("eval")
        evaluate_button = gr.Button("Evaluate", variant="primary", elem_id="evaluate-button")
        scores = gr.Markdown(label="Scores", elem_id="scores")
    return {"models": models, "data": data, "task": task, "metric": metric, "max_length": max_length, "base": base,
            "batch_size": batch_size, "evaluate_button": evaluate_button, "scores": scores, "lm_eval": lm_eval}


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
            task, metric, max_length = selection_options("tune")
            budget = gr.Number(DEFAULT_BUDGET, label="Budget", precision=0, minimum=0, elem_id="budget",
                               info="AME variants to try, besides soup, greedy soup and ingredients")
        base = base_box("tune")
        lm_eval = lm_eval_options("tune")
        advanced = output_advanced()
        tune_button = gr.Button("Tune", variant="primary", elem_id="tune-button")
        summary = gr.Markdown(label="Selected", elem_id="tune-summary")
        with gr.Tab("Candidates"):
            candidates = gr.Markdown(label="Candidates", elem_id="candidates")
        card, config_yaml = result_tabs("tune-card", "tune-config")
    return {"ingredients": ingredients, "data": data, "test_data": test_data, "task": task, "metric": metric,
            "max_length": max_length, "budget": budget, "base": base, "tune_button": tune_button, "summary": summary,
            "candidates": candidates, "card": card, "config_yaml": config_yaml, "advanced": advanced, "lm_eval": lm_eval}


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
        advanced = push_advanced()
        push_button = gr.Button("Push", elem_id="push-button")
        status = gr.Markdown(label="Push status", elem_id="push-status")
    return {"repo_id": repo_id, "private": private, "token": token, "push_button": push_button, "status": status,
            "advanced": advanced}


def _connect(handlers: dict[str, Callable[..., Any]], merge: dict[str, Any], evaluate: dict[str, Any],
             tune: dict[str, Any], push: dict[str, Any], output_folder: gr.State) -> None:
    """Wire the buttons to the handlers; the API endpoints take the inputs in these orders."""
    token = push["token"]
    # New inputs go last: an API caller's positional arguments keep their meaning.
    merge_advanced = merge["advanced"]
    merge["check_button"].click(
        handlers["check"], [merge["ingredients"], merge["dtype"], token, merge["pivot"], merge["base"],
                            merge_advanced["variant"], merge["tokenizer_source"]], merge["report"], api_name="check")
    merge["merge_button"].click(
        handlers["merge"],
        [merge[name] for name in ("ingredients", "optimizer", "lr", "relative_lr", "epochs", "pivot", "seed", "shuffle",
                                  "dtype", "tokenizer_source")] + [token, output_folder, merge["base"]]
        + [merge_advanced[name] for name in ("optimizer_args", "schedule", "batch_size", "order", "compute_dtype",
                                             "max_shard_size", "allow_nonfinite", "variant", "save_as",
                                             "adapter_rank", "adapter_energy", "weights", "transform", "density",
                                             "gamma", "rescale", "disjoint_sum")],
        [merge["card"], merge["config_yaml"], merge["summary"], output_folder], api_name="merge",
    )
    evaluate["evaluate_button"].click(
        handlers["evaluate"],
        [evaluate[name] for name in ("models", "data", "task", "metric", "max_length")]
        + [token, evaluate["base"], evaluate["batch_size"]] + [evaluate["lm_eval"][k] for k in LM_EVAL_KEYS],
        evaluate["scores"], api_name="evaluate")
    tune["tune_button"].click(
        handlers["tune"],
        [tune[name] for name in ("ingredients", "data", "test_data", "task", "metric", "budget", "max_length")]
        + [token, output_folder, tune["base"]]
        + [tune["advanced"][name] for name in ("batch_size", "dtype", "tokenizer_source", "compute_dtype",
                                               "max_shard_size", "allow_nonfinite", "variant", "save_as",
                                               "adapter_rank", "adapter_energy")]
        + [tune["lm_eval"][k] for k in LM_EVAL_KEYS],
        [tune["summary"], tune["candidates"], tune["card"], tune["config_yaml"], output_folder], api_name="tune",
    )
    push["push_button"].click(
        handlers["push"], [push["repo_id"], push["private"], token, output_folder]
        + [push["advanced"][name] for name in ("revision", "create_pr", "commit_message")], push["status"],
        api_name="push")


def launch(port: int | None = None, **kwargs: Any) -> None:
    """Serve the app (`ame-hf space`), without Gradio's run history (it would keep the token box).

    Args:
        port: the server port (default: Gradio's).
        kwargs: passed on to `gr.Blocks.launch`.
    """
    # The run history would keep every input, the token included, in the browser (or a bucket).
    kwargs.setdefault("run_history", False)
    build_app().launch(server_port=port, **kwargs)
