"""The model card of an adapter output: the merge's card with peft's metadata, how to load the adapter over its
base, and a section giving each module's rank and relative reconstruction error and the adapter's size."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .card import _auto_class, reproduce_command
from .card_results import _put_section
from .fetch import format_size
from .recipe import run_yaml

if TYPE_CHECKING:
    from ._lora_factors import AdapterSummary
    from .records import MergeResult

ADAPTER_HEADING = "## LoRA adapter"
USAGE_HEADING = "## How to use"
TAGS = ["lora", "peft"]


def adapter_section(summary: "AdapterSummary") -> str:
    """The card's "LoRA adapter" section: size, ranks, and each module's relative error (worst first).

    Args:
        summary: what `adapter_out.write_adapter` wrote.

    Returns:
        Markdown.
    """
    factors = summary.factors
    worst = max((f.error for f in factors.values()), default=0.0)
    ranks = sorted({f.rank for f in factors.values()})
    lines = [f"This output is a **PEFT LoRA adapter** of `{summary.base.display_name if summary.base else 'its base'}`"
             f" ({format_size(summary.nbytes)} in `adapter_model.safetensors`): each changed linear weight's delta "
             "(merged minus base) factored by a truncated SVD, scaling 1. The merged model is `W_base + B @ A`.",
             "",
             f"- factored modules: {len(factors)}, rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]} to {ranks[-1]}'}"
             if factors else "- factored modules: none",
             f"- largest relative reconstruction error `||delta - B @ A|| / ||delta||`: {worst:.3g}",
             f"- saved whole (`modules_to_save`): {', '.join(f'`{m}`' for m in summary.saved) or 'none'}",
             "", "| module | rank | relative error | SVD |", "|---|---|---|---|"]
    for module, f in sorted(factors.items(), key=lambda item: (-item[1].error, item[0])):
        lines.append(f"| `{module}` | {f.rank} | {f.error:.3g} | {f.method} |")
    return "\n".join(lines)


def usage_section(summary: "AdapterSummary", name: str, model_config: dict[str, Any]) -> str:
    """How to load the adapter over its base (resized first when the adapter saves new vocabulary rows)."""
    auto = _auto_class(model_config)[0]
    base = summary.base.repo_id or str(summary.base.path) if summary.base else "BASE"
    resize = any(m.endswith(("embed_tokens", "lm_head", "wte", "word_embeddings")) for m in summary.saved)
    lines = ["```python", "from peft import PeftModel", f"from transformers import {auto}, AutoTokenizer", "",
             f'# "{name}" is the local output folder; once it is on the Hub, use its repo ID instead.',
             f'base = {auto}.from_pretrained("{base}")']
    if resize:
        lines += [f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
                  "base.resize_token_embeddings(len(tokenizer))  # when the merge added tokens"]
    lines += [f'model = PeftModel.from_pretrained(base, "{name}")',
              "merged = model.merge_and_unload()  # the full merged model, if you want it", "```"]
    return "\n".join(lines)


def reproduce_section(result: "MergeResult") -> str:
    """The card's "Reproduce" section for the adapter: the command and `ame_config.yaml` with `--save-as adapter`."""
    return (f"The same adapter, from the pinned ingredients:\n\n```bash\n{reproduce_command(result)}\n```\n\n"
            "or, with the configuration below saved as `ame_config.yaml`:\n\n```bash\n"
            f"ame-hf merge --config ame_config.yaml --out merged\n```\n\n```yaml\n{run_yaml(result)}```")


def write_adapter_card(source: Path, staging: Path, summary: "AdapterSummary", *, name: str,
                       model_config: dict[str, Any], result: "MergeResult | None" = None) -> None:
    """`staging/README.md`: the card at `source` (a merge's) as an adapter's card.

    Args:
        source: the full merge's README.md (a new card when missing).
        staging: the adapter output's folder.
        summary: what was written.
        name: the output folder's name (for the usage example).
        model_config: the merged model's config (its Auto class).
        result: the merge's record: its Reproduce section is rewritten for the adapter (else kept).
    """
    from huggingface_hub import ModelCard

    card = ModelCard.load(source) if source.is_file() else ModelCard("---\n---\n")
    data = card.data
    data.library_name = "peft"
    if summary.base is not None and summary.base.repo_id:
        data.base_model = summary.base.repo_id
        data.base_model_relation = "adapter"
    else:
        data.base_model_relation = None
    data.tags = list(dict.fromkeys([*(data.tags or []), *TAGS]))
    text = str(ModelCard(f"---\n{data.to_yaml()}\n---\n{card.text}"))
    text = _put_section(text, USAGE_HEADING, f"\n{USAGE_HEADING}\n\n{usage_section(summary, name, model_config)}\n", ())
    text = _put_section(text, ADAPTER_HEADING, f"\n{ADAPTER_HEADING}\n\n{adapter_section(summary)}\n",
                        ("\n## Ingredients",))
    if result is not None:
        text = _put_section(text, "## Reproduce", f"\n## Reproduce\n\n{reproduce_section(result)}\n", ())
    (staging / "README.md").write_text(text, encoding="utf-8")
