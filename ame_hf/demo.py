"""`ame-hf demo`: tiny GPT-2 experts fine-tuned locally on distinct synthetic tasks, merged with
the default AME and with the soup, reloaded with `from_pretrained` and compared. Nothing downloaded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger(__name__)

VOCAB = 20          # ordinary tokens 0..19
TASKS = ("count", "skip3", "repeat")
TASK_TOKEN = {name: VOCAB + i for i, name in enumerate(TASKS)}  # first token says which task
BASE_TOKEN = VOCAB + len(TASKS)
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

    return GPT2Config(vocab_size=VOCAB + len(TASKS) + 1, n_positions=SEQ_LEN, n_embd=32, n_layer=2,
                      n_head=2, n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=0, eos_token_id=0)


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
        loss = model(input_ids=batch, labels=batch).loss
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
        out[task] = float(model(input_ids=batch, labels=labels).loss)
    return out


def build_experts(workdir: Path, steps: int = DEFAULT_STEPS, log: Callable[[str], None] | None = None) -> list[Path]:
    """A shared base (generic pre-training) and one fine-tune per task, saved with save_pretrained."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_config())
    train(base, "base", steps, seed=0)
    base.save_pretrained(workdir / "base")
    paths = []
    for i, task in enumerate(TASKS):
        expert = GPT2LMHeadModel.from_pretrained(workdir / "base")
        train(expert, task, steps, seed=100 + i)
        path = workdir / f"expert-{task}"
        expert.save_pretrained(path)
        paths.append(path)
        if log:
            log(f"fine-tuned expert-{task} ({steps} steps)")
    return paths


def run_demo(out: str | Path = "ame-demo", *, steps: int = DEFAULT_STEPS, progress: bool = True,
             log: Callable[[str], None] | None = print) -> list[DemoRow]:
    """Build experts, merge them with the default AME and the soup, reload everything, compare."""
    from transformers import AutoModelForCausalLM

    from .config import AmeConfig
    from .merging import merge

    workdir = Path(out)
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


def format_table(rows: list[DemoRow]) -> str:
    """A plain-text table of held-out loss per task."""
    head = f"{'model':34s}" + "".join(f"{t:>9s}" for t in TASKS) + f"{'mean':>9s}"
    lines = ["held-out next-token loss (lower is better)", head, "-" * len(head)]
    for row in rows:
        lines.append(f"{row.model:34s}" + "".join(f"{row.losses[t]:9.3f}" for t in TASKS) + f"{row.mean:9.3f}")
    return "\n".join(lines)
