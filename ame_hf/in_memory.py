"""Candidates that never touch the disk: a merge built by the streaming engine straight into a transformers model in
memory (the tensors `merge` would write, in its dtype), for `tune` and the greedy soup to score and drop; only their
pick is written."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from .config import QUANTIZED_OUTPUT_DTYPES, AmeConfig
from .devices import cpu_threads, process_setup
from .engine import ingredient_order
from .inputs import InputStage
from .plan import output_dtype, plan_shards
from .streaming import DEFAULT_MAX_MEMORY, TensorMerger, stream_tensors

logger = logging.getLogger(__name__)

# The auto class of each evaluation task: what loads a model folder for it (`evaluation`).
# (Image classification is left to the disk: its pipeline would need the processor found from the model object.)
_AUTO = {"text-generation": "AutoModelForCausalLM", "text-classification": "AutoModelForSequenceClassification"}
# Room a candidate needs besides its tensors: the model built from them holds a second copy while it loads.
_HEADROOM = 3


def available_memory() -> int | None:
    """Bytes of RAM available now (Linux `MemAvailable`), or None where that cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def merge_model(refs: Sequence[str | os.PathLike], config: AmeConfig, task: str, *, stage: InputStage,
                device: str | None = None) -> Any | None:
    """The model `merge(refs, out, config)` would write, built in memory and ready to score; None when it cannot
    be: a distributed run, sentence-transformers module folders, differing vocabularies (their finish rewrites
    config and tokenizer), fp8 or adapter output, a task without an auto class, or tensors beyond the RAM available.

    The tensors are the bytes `merge` writes (the engine's writer fills a state dict instead of the shards: same
    blocks, same dtype conversion); transformers builds the model from them as `from_pretrained` would from the
    folder. Its `name_or_path` is the folder of the tokenizer the merge would copy.

    Args:
        refs: the ingredients (pinned references or local paths).
        config: the candidate's `AmeConfig`.
        task: the evaluation task (which auto class builds the model).
        stage: the run's `InputStage` (every input resolved, fetched and opened once for all candidates).
        device: where the engine computes (the model is built on the CPU; scoring moves it).

    Returns:
        A transformers model in eval mode, or None.
    """
    import transformers

    config = config.resolved()
    refs = [os.fspath(r) for r in refs]
    setup = process_setup(device)
    # An FP8 or MXFP4 output is quantized after the writing, and an adapter output is factored from a written full model.
    if (setup.world > 1 or task not in _AUTO or config.dtype in QUANTIZED_OUTPUT_DTYPES
            or config.save_as == "adapter"):
        return None
    inputs = stage.check(refs, pivot=config.pivot, base=config.base, tokenizer_source=config.tokenizer_source,
                         allow_dtype_mismatch=config.dtype != "auto")
    inputs.raise_for_errors()
    inputs.open()
    report, checkpoints = inputs.report, inputs.checkpoints
    if inputs.modules or report.vocab is not None:
        return None
    tensors = {n: checkpoints[0].info(n) for n in checkpoints[0].names()}
    plan = plan_shards([(n, i.shape, output_dtype(config, i.dtype)) for n, i in tensors.items()], 2**62, {})
    room = available_memory()
    if room is not None and plan.total_size * _HEADROOM > room:
        logger.info("candidate of %.1f GB does not fit in memory: written to disk", plan.total_size / 1e9)
        return None
    pivot = inputs.pivot_ingredient
    order = ingredient_order(len(refs), config.epochs, shuffle=config.shuffle, seed=config.seed, order=config.order)
    merger = TensorMerger(checkpoints, inputs.pivot_checkpoint or pivot or (0 if config.pivot == "first" else
                                                                           config.pivot),
                          config, order, setup.device, max_memory=DEFAULT_MAX_MEMORY)
    merger.into = {}
    with cpu_threads(setup.device, None):
        stream_tensors(merger, list(tensors), None, plan, show=False)
    model_config = transformers.AutoConfig.from_pretrained(report.config_source().path)
    auto = getattr(transformers, _AUTO[task])
    floating = [t.dtype for t in merger.into.values() if t.is_floating_point()]
    model = auto._model_mapping[type(model_config)].from_pretrained(
        None, config=model_config, state_dict=merger.into, dtype=floating[0] if floating else None)
    tokenizer = str(inputs.tokenizer_dir())
    model.name_or_path = model.config._name_or_path = tokenizer
    return model.eval()
