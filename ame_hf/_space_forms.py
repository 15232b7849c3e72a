"""The Space's form parts that several tabs share, and each tab's Advanced options (closed by default).
Built only inside `space.build_app` (gradio is imported there); the builders return the boxes by the library keyword
each one sets, so a box means what the CLI flag and the Python keyword of that name mean."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .space_select import TASK_CHOICES

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["base_box", "eval_batch_box", "lm_eval_options", "merge_advanced", "output_advanced", "push_advanced",
           "result_tabs", "selection_options", "weights_file_options"]


def result_tabs(card_id: str, config_id: str) -> tuple[gr.Markdown, gr.Code]:
    """A result's model card and `ame_config.yaml`, a tab each."""
    import gradio as gr

    with gr.Tab("Model card"):
        card = gr.Markdown(label="Model card", elem_id=card_id, container=True, min_height=80, max_height=520)
    with gr.Tab("ame_config.yaml"):
        config = gr.Code(language="yaml", label="ame_config.yaml", interactive=False, max_lines=24, elem_id=config_id)
    return card, config


def base_box(prefix: str) -> gr.Textbox:
    """`base`: the base model of LoRA adapters among the models."""
    import gradio as gr

    return gr.Textbox("", label="Base model (for LoRA adapters)", placeholder="org/base-model",
                      info="blank: each adapter's own base_model_name_or_path", elem_id=f"{prefix}-base")


def selection_options(prefix: str) -> tuple[gr.Dropdown, gr.Textbox, gr.Number]:
    """Task, metric and max length: what `evaluate` and `tune` share."""
    import gradio as gr

    with gr.Column():
        task = gr.Dropdown(list(TASK_CHOICES), value="auto", label="Task", elem_id=f"{prefix}-task",
                           info="auto: from the models' architecture")
        metric = gr.Textbox("", label="Metric", placeholder="default", elem_id=f"{prefix}-metric",
                            info="blank: accuracy; loss for text-generation; or macro_f1, perplexity")
        # 0, not None: a browser shows and sends an empty number box as 0.
        max_length = gr.Number(0, label="Max length", precision=0, minimum=0, elem_id=f"{prefix}-max-length",
                               info="text-generation: tokens per document; 0: the model's limit")
    return task, metric, max_length


def lm_eval_options(prefix: str) -> dict[str, Any]:
    """lm-evaluation-harness tasks as the score instead of the data (closed by default). Returns the boxes by
    keyword (`_space_lm_eval.LM_EVAL_KEYS`)."""
    import gradio as gr

    with gr.Accordion("lm-evaluation-harness tasks (instead of the data)", open=False, elem_id=f"{prefix}-lm-eval"):
        with gr.Row():
            tasks = gr.Textbox("", label="lm-eval tasks", placeholder="arc_easy,hellaswag=2",
                               elem_id=f"{prefix}-lm-eval-tasks", info="NAME[=WEIGHT],...; needs ame-hf[lm-eval]")
            include = gr.Textbox("", label="Task folder", placeholder="/path/to/task-yamls",
                                 elem_id=f"{prefix}-lm-eval-include",
                                 info="local task YAMLs on this machine (not on a public Space)")
            metric = gr.Textbox("", label="lm-eval metric", placeholder="acc,none", elem_id=f"{prefix}-lm-eval-metric",
                                info="as lm-eval names it; blank: acc,none")
        with gr.Row():
            limit = gr.Number(0, label="Documents per task", precision=0, minimum=0,
                              elem_id=f"{prefix}-lm-eval-limit", info="0: all")
            fewshot = gr.Textbox("", label="Few-shot examples", placeholder="task default",
                                 elem_id=f"{prefix}-lm-eval-num-fewshot", info="blank: each task's own")
    return {"lm_eval_tasks": tasks, "lm_eval_include": include, "lm_eval_metric": metric, "lm_eval_limit": limit,
            "lm_eval_num_fewshot": fewshot}


def eval_batch_box(prefix: str) -> gr.Number:
    """The evaluation's `batch_size` (`--eval-batch-size`); 0, as a browser sends an empty box, is the default."""
    import gradio as gr

    return gr.Number(0, label="Evaluation batch size", precision=0, minimum=0, elem_id=f"{prefix}-batch-size",
                     info="examples per forward pass; 0: the default")


def weights_file_options(prefix: str) -> dict[str, Any]:
    """What merge and tune share of how the output is computed and written: `compute_dtype`, `max_shard_size`,
    `variant`, `allow_nonfinite`, and `save_as` with the adapter's rank options. Returns the boxes by keyword."""
    import gradio as gr

    from .config import COMPUTE_DTYPES, DEFAULT_MAX_SHARD_SIZE, SAVE_AS

    with gr.Row():
        compute_dtype = gr.Dropdown(list(COMPUTE_DTYPES), value=COMPUTE_DTYPES[0], label="Compute dtype",
                                    elem_id=f"{prefix}-compute-dtype", info="the optimizer's arithmetic")
        max_shard_size = gr.Textbox("", label="Max shard size", placeholder=DEFAULT_MAX_SHARD_SIZE,
                                    elem_id=f"{prefix}-max-shard-size",
                                    info=f"with its unit: 500MB, 2GiB; blank: {DEFAULT_MAX_SHARD_SIZE}")
    with gr.Row():
        variant = gr.Textbox("", label="Weights variant", placeholder="fp16", elem_id=f"{prefix}-variant",
                             info="read and write model.NAME.safetensors; blank: none")
        allow_nonfinite = gr.Checkbox(False, label="Allow NaN/Inf in the output", elem_id=f"{prefix}-allow-nonfinite")
    with gr.Row():
        save_as = gr.Dropdown(list(SAVE_AS), value=SAVE_AS[0], label="Save as", elem_id=f"{prefix}-save-as",
                              info="adapter: a PEFT LoRA adapter of the base (Base model box, or the adapters' own)")
        adapter_rank = gr.Number(0, label="Adapter rank", precision=0, minimum=0, elem_id=f"{prefix}-adapter-rank",
                                 info="largest LoRA rank; 0: each delta's own rank (lossless)")
        adapter_energy = gr.Textbox("", label="Adapter energy", placeholder="0.99", elem_id=f"{prefix}-adapter-energy",
                                    info="keep this fraction of each delta's squared singular values; blank: all")
    return {"compute_dtype": compute_dtype, "max_shard_size": max_shard_size, "variant": variant,
            "allow_nonfinite": allow_nonfinite, "save_as": save_as, "adapter_rank": adapter_rank,
            "adapter_energy": adapter_energy}


def merge_advanced() -> dict[str, Any]:
    """The Merge tab's Advanced options: `optimizer_args`, `schedule`, `batch_size`, `order` and the weights-file
    options. Returns the boxes by keyword."""
    import gradio as gr

    from .config import DEFAULT_ORDER, ORDERS, SCHEDULES

    with gr.Accordion("Advanced options", open=False, elem_id="merge-advanced"):
        optimizer_args = gr.Textbox("", label="Optimizer arguments (JSON)", placeholder='{"betas": [0.9, 0.99]}',
                                    elem_id="optimizer-args", info="other keyword arguments of the optimizer")
        with gr.Row():
            schedule = gr.Dropdown([("default", ""), *((s, s) for s in SCHEDULES)], value="", label="Schedule",
                                   elem_id="schedule", info="default: the optimizer's")
            batch_size = gr.Number(1, label="Batch size", precision=0, minimum=1, elem_id="batch-size",
                                   info="pseudogradients averaged per step")
            order = gr.Dropdown(list(ORDERS), value=DEFAULT_ORDER, label="Order", allow_custom_value=True,
                                elem_id="order", info="given, reverse, or indices such as 2,0,1")
        boxes = weights_file_options("merge")
        boxes.update(transform_options())
    return {"optimizer_args": optimizer_args, "schedule": schedule, "batch_size": batch_size, "order": order,
            **boxes}


def transform_options() -> dict[str, Any]:
    """The Merge tab's ingredient weights and task-vector transform boxes (README "Ingredient weights", "TIES and
    DARE"), by keyword."""
    import gradio as gr

    from .transform_options import RESCALES, TRANSFORMS

    weights = gr.Textbox("", label="Ingredient weights", placeholder="0.5,0.3,0.2", elem_id="weights",
                         info="one per ingredient (default: equal)")
    with gr.Row():
        transform = gr.Dropdown(list(TRANSFORMS), value="none", label="Transform", elem_id="transform",
                                info="TIES / DARE on the task vectors (ingredient - pivot; set the pivot to the base)")
        density = gr.Textbox("", label="Density", placeholder="1", elem_id="density",
                             info="fraction kept, or one per ingredient")
        gamma = gr.Textbox("", label="Gamma", placeholder="0.01", elem_id="gamma", info="breadcrumbs: largest dropped")
        rescale = gr.Dropdown([("default", ""), *((r, r) for r in RESCALES)], value="", label="Rescale",
                              elem_id="rescale", info="what the transform keeps")
        disjoint_sum = gr.Checkbox(False, label="Sum the agreeing task vectors", elem_id="disjoint-sum")
    return {"weights": weights, "transform": transform, "density": density, "gamma": gamma, "rescale": rescale,
            "disjoint_sum": disjoint_sum}


def output_advanced() -> dict[str, Any]:
    """The Tune tab's Advanced options: the evaluation's `batch_size` and the output options `tune` passes to its
    merges (`config=AmeConfig(dtype=..., tokenizer_source=..., ...)`). Returns the boxes by keyword."""
    import gradio as gr

    from .config import OUTPUT_DTYPES, SOURCE_WORDS

    with gr.Accordion("Advanced options", open=False, elem_id="tune-advanced"):
        with gr.Row():
            batch_size = eval_batch_box("tune")
            dtype = gr.Dropdown(list(OUTPUT_DTYPES), value="auto", label="Output dtype", elem_id="tune-dtype")
            tokenizer_source = gr.Dropdown(list(SOURCE_WORDS), value="auto", label="Tokenizer source",
                                           allow_custom_value=True, elem_id="tune-tokenizer-source",
                                           info="pivot, first, an index, a repo ID")
        boxes = weights_file_options("tune")
    return {"batch_size": batch_size, "dtype": dtype, "tokenizer_source": tokenizer_source, **boxes}


def push_advanced() -> dict[str, Any]:
    """Push's Advanced options: `revision`, `create_pr`, `commit_message`. Returns the boxes by keyword."""
    import gradio as gr

    with gr.Accordion("Advanced options", open=False, elem_id="push-advanced"):
        with gr.Row():
            revision = gr.Textbox("", label="Branch", placeholder="main", elem_id="push-revision",
                                  info="blank: the repo's default branch")
            create_pr = gr.Checkbox(False, label="Open a pull request", elem_id="create-pr")
            commit_message = gr.Textbox("", label="Commit message", placeholder="default", elem_id="commit-message")
    return {"revision": revision, "create_pr": create_pr, "commit_message": commit_message}


def adapter_options(save_as: str | None, adapter_rank: float | None, adapter_energy: str | None) -> dict[str, Any]:
    """The adapter boxes as `AmeConfig` keywords: a rank of 0 (an empty box) and a blank energy are the defaults.

    >>> adapter_options("adapter", 8.0, "0.99")
    {'save_as': 'adapter', 'adapter_rank': 8, 'adapter_energy': '0.99'}
    >>> adapter_options("model", 0, " ")
    {'save_as': 'model', 'adapter_rank': None, 'adapter_energy': None}
    """
    rank = int(adapter_rank) if adapter_rank and float(adapter_rank) == int(adapter_rank) else adapter_rank or None
    energy = (adapter_energy or "").strip() or None
    return {"save_as": save_as or "model", "adapter_rank": rank, "adapter_energy": energy}
