"""`ame-hf demo`: tiny GPT-2 experts fine-tuned locally on distinct synthetic tasks, merged with
the default AME and with the soup, reloaded with `from_pretrained` and compared. Nothing downloaded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ._quiet import quiet_libraries

logger = logging.getLogger(__name__)

VOCAB = 20          # ordinary tokens 0..19
TASKS = ("count", "skip3", "repeat")
TASK_TOKEN = {name: VOCAB + i for i, name in enumerate(TASKS)}  # first token says which task
BASE_TOKEN = VOCAB + len(TASKS)
# The tokenizer's words for those ids: "0".."19", then one named token per task, then the base's.
TOKEN_WORDS = [str(i) for i in range(VOCAB)] + [f"<{name}>" for name in TASKS] + ["<base>"]
SEQ_LEN = 16
DEFAULT_STEPS = 120


@dataclass
class DemoRow:
    """Held-out next-token loss of one model on each task (lower is better)."""

    model: str
    losses: dict[str, float]

    @property
    def mean(self) -> float:
        return sum(self.losses.values()) / len(self.losses)


def tiny_config():
    """The tiny GPT-2 every demo and test model is built from (no download)."""
    from transformers import GPT2Config

    # The demo's sequences have no end: <base> (never a training target, only a first token) is the
    # end/padding token, so generation runs to the length limit instead of stopping at the word "0".
    return GPT2Config(vocab_size=len(TOKEN_WORDS), n_positions=SEQ_LEN, n_embd=32, n_layer=2,
                      n_head=2, n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=BASE_TOKEN, eos_token_id=BASE_TOKEN, pad_token_id=BASE_TOKEN)


def tiny_tokenizer():
    """A word-level tokenizer whose ids are the demo's token ids ("0".."19", `<count>`, ..., `<base>`).

    Built locally with `tokenizers` (nothing downloaded) and saved with every demo model, so the
    merged outputs work with `AutoTokenizer` and `pipeline("text-generation")`.

    Returns:
        A `transformers.PreTrainedTokenizerFast`.

    >>> tiny_tokenizer()("<count> 3 4 5")["input_ids"]
    [20, 3, 4, 5]
    >>> tiny_tokenizer()("hello 3")["input_ids"]  # an unknown word reads as <base>
    [23, 3]
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Every id is taken by a demo token, and adding one would change the model: a word the demo does not know
    # reads as <base>, the start token no expert was trained to predict (without an unknown token, any other
    # word raised "Missing [UNK] token" in the text-generation pipeline).
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(TOKEN_WORDS)}, unk_token="<base>"))
    # Split on spaces only: the default Whitespace pre-tokenizer would cut "<count>" into "<", "count", ">".
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Each word decodes with a leading space, as GPT-2's tokens do: the text-generation pipeline
    # decodes only the new tokens and appends them to the prompt, which needs the separating space.
    tok.decoder = decoders.Replace(Regex("^"), " ")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<base>", eos_token="<base>",
                                   pad_token="<base>", unk_token="<base>", model_max_length=SEQ_LEN)


def _save(model, tokenizer, path: Path) -> None:
    """`save_pretrained` of a demo model with its tokenizer, and generation capped to the context."""
    # GPT-2's default max_length (20) is beyond the 16 positions: generation would index past them.
    model.generation_config.max_length = SEQ_LEN
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def make_batch(task: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences of one synthetic task: counting, counting by 3, or repeating a 3-token motif."""
    start = torch.randint(0, VOCAB, (size, 1), generator=generator)
    steps = torch.arange(SEQ_LEN - 1).unsqueeze(0)
    if task == "count":
        body = (start + steps) % VOCAB
    elif task == "skip3":
        body = (start + 3 * steps) % VOCAB
    elif task == "repeat":
        motif = torch.randint(0, VOCAB, (size, 3), generator=generator)
        body = motif.repeat(1, SEQ_LEN)[:, : SEQ_LEN - 1]
    elif task == "base":  # generic pre-training: random walks of +-1
        moves = torch.randint(0, 2, (size, SEQ_LEN - 1), generator=generator) * 2 - 1
        body = (start + torch.cumsum(moves, dim=1)) % VOCAB
    else:
        raise ValueError(task)
    first = torch.full((size, 1), TASK_TOKEN.get(task, BASE_TOKEN))
    return torch.cat([first, body], dim=1)


def train(model, task: str, steps: int, seed: int, lr: float = 3e-3) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = make_batch(task, 32, generator)
        loss = model(input_ids=batch, attention_mask=_unpadded(batch), labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def task_losses(model, seed: int = 1234) -> dict[str, float]:
    """Held-out loss per task, on the positions after the first two tokens of the body."""
    out = {}
    for task in TASKS:
        batch = make_batch(task, 256, torch.Generator().manual_seed(seed))
        labels = batch.clone()
        labels[:, :3] = -100  # the first body tokens are random: not predictable
        out[task] = float(model(input_ids=batch, attention_mask=_unpadded(batch), labels=labels).loss)
    return out


def _unpadded(batch: torch.Tensor) -> torch.Tensor:
    """The attention mask of sequences without padding. <base> is the pad token but also the first token
    of every base sequence: without a mask transformers cannot tell, and advises one on every call."""
    return torch.ones_like(batch)


def build_experts(workdir: Path, steps: int = DEFAULT_STEPS, log: Callable[[str], None] | None = None) -> list[Path]:
    """A shared base (generic pre-training) and one fine-tune per task, saved with save_pretrained."""
    from transformers import GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_config())
    train(base, "base", steps, seed=0)
    _save(base, tokenizer, workdir / "base")
    paths = []
    for i, task in enumerate(TASKS):
        expert = GPT2LMHeadModel.from_pretrained(workdir / "base")
        train(expert, task, steps, seed=100 + i)
        path = workdir / f"expert-{task}"
        _save(expert, tokenizer, path)
        paths.append(path)
        if log:
            log(f"fine-tuned expert-{task} ({steps} steps)")
    return paths


def run_demo(out: str | Path = "ame-demo", *, steps: int = DEFAULT_STEPS, progress: bool = True,
             log: Callable[[str], None] | None = print) -> list[DemoRow]:
    """Build experts, merge them with the default AME and the soup, reload everything, compare.

    `progress=False` also keeps transformers and huggingface_hub quiet (`quiet_libraries`)."""
    with quiet_libraries(not progress):
        return _run_demo(Path(out), steps, progress, log)


def _run_demo(workdir: Path, steps: int, progress: bool, log: Callable[[str], None] | None) -> list[DemoRow]:
    from transformers import AutoModelForCausalLM

    from .config import AmeConfig
    from .merging import merge

    workdir.mkdir(parents=True, exist_ok=True)
    experts = build_experts(workdir, steps, log)
    merges = {"soup (SGD, lr 1, harmonic)": AmeConfig.soup(), "AME default (adam, relative lr)": AmeConfig()}
    rows = []
    for label, config in merges.items():
        name = "merged-soup" if config.is_soup else "merged-ame"
        result = merge(experts, workdir / name, config, overwrite=True, progress=progress)
        if log:
            log(f"{label}: wrote {result.path}")
        rows.append(DemoRow(label, task_losses(AutoModelForCausalLM.from_pretrained(result.path))))
    for path in [workdir / "base", *experts]:
        rows.append(DemoRow(path.name, task_losses(AutoModelForCausalLM.from_pretrained(path))))
    return rows


def next_commands(out: str | Path = "ame-demo") -> list[str]:
    """Shell commands to try on the demo's files next (each one runs as printed, from the same directory).

    Args:
        out: the demo's working directory, as the user gave it.

    Returns:
        Commands: generate with the merged model, merge two experts, check all three.
    """
    import shlex

    root = Path(out)
    merged, experts = root / "merged-ame", [root / f"expert-{task}" for task in TASKS]
    generate = ("from transformers import pipeline; "
                f"print(pipeline('text-generation', model={str(merged)!r})('<count> 3 4 5')[0]['generated_text'])")
    # Double quotes around the Python (it holds only single quotes) read better than shlex's '"'"' escapes;
    # a path with a double quote, `$` or a backquote falls back to shlex.
    plain = not any(c in generate for c in '"$`\\')
    return [
        f'python -c "{generate}"' if plain else shlex.join(["python", "-c", generate]),
        shlex.join(["ame-hf", "merge", str(experts[0]), str(experts[1]), "--out", str(root / "merged-2"),
                    "--overwrite"]),
        shlex.join(["ame-hf", "check", *map(str, experts)]),
    ]


def format_table(rows: list[DemoRow]) -> str:
    """A plain-text table of held-out loss per task."""
    head = f"{'model':34s}" + "".join(f"{t:>9s}" for t in TASKS) + f"{'mean':>9s}"
    lines = ["held-out next-token loss (lower is better)", head, "-" * len(head)]
    for row in rows:
        lines.append(f"{row.model:34s}" + "".join(f"{row.losses[t]:9.3f}" for t in TASKS) + f"{row.mean:9.3f}")
    return "\n".join(lines)
