"""The tests' shared helpers, all in this one module: what they build and how they check a failure.

- Tiny model checkpoints built from configs and saved with `save_pretrained` ("fine-tunes" are one base
  model plus a seeded perturbation per ingredient; nothing is downloaded), tiny text classifiers for
  evaluate / tune, PEFT LoRA adapters built with peft (and peft's own `merge_and_unload()` of them, the
  reference), and `make_big_checkpoints` (one large tensor, for memory and interruption tests).
- Running the CLI (`run_cli` in this process, `start_cli` as a child) and the one check of "a failure is
  exactly one clear error line": `assert_one_error_line` (or `cli_error_line`, which runs and checks).
- Reading the scores back from printed tables: `score_table` (the CLI's), `markdown_rows` (the Space's).

Fixtures built from these live in conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                  tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    values = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, max_position_embeddings=32, num_labels=3)
    values.update(overrides)
    return BertConfig(**values)


def build_base(kind: str = "llama", seed: int = 0, **overrides):
    """A freshly initialised tiny model (`llama` causal LM, or `bert` sequence classifier)."""
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(tiny_llama_config(**overrides))
    if kind == "bert":
        return BertForSequenceClassification(tiny_bert_config(**overrides))
    raise ValueError(kind)


def make_finetunes(
    root: Path,
    n: int = 3,
    *,
    kind: str = "llama",
    dtype: torch.dtype = torch.float32,
    scale: float = 0.02,
    seed: int = 0,
    names: Sequence[str] | None = None,
    max_shard_size: str | None = None,
    **overrides,
) -> list[Path]:
    """Save `n` perturbed copies of one base model under `root`; returns their directories."""
    base = build_base(kind, seed=seed, **overrides).to(dtype)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = []
    for i in range(n):
        gen = torch.Generator().manual_seed(1000 * (seed + 1) + i)
        with torch.no_grad():
            for name, param in base.state_dict().items():
                if param.is_floating_point():
                    noise = torch.randn(param.shape, generator=gen) * scale
                    param.copy_((state[name].float() + noise).to(dtype))
        path = root / (names[i] if names else f"ft{i}")
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        base.save_pretrained(path, **kwargs)
        paths.append(path)
    return paths


def save_base(root: Path, kind: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """The unperturbed base model (a pivot checkpoint)."""
    model = build_base(kind, seed=seed, **overrides).to(dtype)
    model.save_pretrained(root)
    return root


def make_big_checkpoints(root: Path, n: int = 3, rows: int = 60_000, cols: int = 256,
                         dtype: torch.dtype = torch.float32) -> list[Path]:
    """`n` checkpoints `root/big{i}` of one `rows x cols` float32 tensor (`embed.weight`, seeded by i) and a
    `norm.weight` (both in `dtype`), with a minimal llama config.json. The default is 61 MB each: long enough to interrupt a
    merge mid-write; 400_000 rows (391 MiB) make whole-tensor processing show in a memory measurement."""
    from safetensors.torch import save_file

    paths = []
    for i in range(n):
        d = root / f"big{i}"
        d.mkdir(parents=True)
        gen = torch.Generator().manual_seed(i)
        save_file({"embed.weight": torch.randn(rows, cols, generator=gen).to(dtype),
                   "norm.weight": torch.ones(cols, dtype=dtype)},
                  d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": cols, "vocab_size": rows}))
        paths.append(d)
    return paths


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved model directory (single or sharded safetensors)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def weights_sha256(path: Path) -> dict[str, str]:
    """sha256 of every weight file (and the index) of an output directory."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(path).iterdir()) if f.name.endswith((".safetensors", ".index.json"))}


# -- tiny text classifiers (for evaluate / tune) ------------------------------------------------

COLORS = ["red", "green", "blue"]
FILLER = ["the", "a", "cat", "dog", "runs", "sits", "big", "small"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *COLORS, *FILLER]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def color_examples(n: int, seed: int, label_weights=(1.0, 1.0, 1.0)):
    """Sentences whose label is the colour word they contain."""
    gen = torch.Generator().manual_seed(seed)
    label_dist = torch.tensor(label_weights, dtype=torch.float)
    out = []
    for _ in range(n):
        label = int(torch.multinomial(label_dist, 1, generator=gen))
        words = [COLORS[label]] + [FILLER[int(i)] for i in torch.randint(0, len(FILLER), (4,), generator=gen)]
        order = torch.randperm(len(words), generator=gen)
        out.append((" ".join(words[int(i)] for i in order), label))
    return out


def make_text_classifiers(root: Path, n: int = 3, steps: int = 60) -> tuple[list[Path], Path]:
    """`n` tiny BERT classifiers fine-tuned from one base on label-skewed data, and a balanced
    validation JSONL file. Returns (expert directories, validation file)."""
    from transformers import BertForSequenceClassification

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = tiny_bert_config(vocab_size=len(tokenizer), num_labels=3,
                              id2label={i: c for i, c in enumerate(COLORS)},
                              label2id={c: i for i, c in enumerate(COLORS)})
    base = BertForSequenceClassification(config)
    base.save_pretrained(root / "base")
    paths = []
    for i in range(n):
        model = BertForSequenceClassification.from_pretrained(root / "base")
        weights = [0.1] * 3
        weights[i % 3] = 1.0
        data = color_examples(32 * steps, seed=10 + i, label_weights=weights)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for s in range(steps):
            batch = data[32 * s: 32 * (s + 1)]
            enc = tokenizer([t for t, _ in batch], return_tensors="pt", padding=True)
            loss = model(**enc, labels=torch.tensor([l for _, l in batch])).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        path = root / f"expert{i}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps({"text": t, "label": COLORS[l]}) + "\n" for t, l in color_examples(90, seed=99)))
    return paths, val


# -- tiny causal LMs with text (for text-generation evaluate / tune) ------------------------------

def make_lm_data(path: Path, per_task: int, seed: int, tasks: Sequence[str] | None = None) -> Path:
    """A `.txt` file of the demo's synthetic sequences (one document per line), `per_task` of each task."""
    from ame_hf.demo import TASKS, TOKEN_WORDS, make_batch

    gen = torch.Generator().manual_seed(seed)
    lines = [" ".join(TOKEN_WORDS[i] for i in row.tolist())
             for task in (tasks or TASKS) for row in make_batch(task, per_task, gen)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_lm_experts(root: Path, steps: int = 20) -> tuple[list[Path], Path, Path]:
    """The demo's tiny GPT-2 experts (one per synthetic task, with their tokenizer) and validation and test
    text files: (expert directories, val.txt, test.txt)."""
    from ame_hf.demo import build_experts

    experts = build_experts(root, steps=steps)
    return experts, make_lm_data(root / "val.txt", 10, seed=1), make_lm_data(root / "test.txt", 10, seed=2)


# -- PEFT LoRA adapters of a tiny causal LM (for adapters as ingredients) -------------------------

LM_LORAS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["up_proj", "down_proj", "k_proj"]),
]


def perturb(params: Any, seed: int, scale: float = 0.05) -> None:
    """Move each of `params` in place by seeded noise of std `scale` (one generator, in their order)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def make_lora_adapter(base_dir: Path, out: Path, options: dict[str, Any], seed: int,
                      base_name: str | None = "", scale: float = 0.05) -> Path:
    """A PEFT LoRA adapter of the causal LM in `base_dir`, saved by peft with every trained tensor moved by
    seeded noise of std `scale` (LoRA B starts at zero). Its config names `base_name` as its base (default:
    `base_dir`; None: no base at all)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**options))
    perturb((p for p in model.parameters() if p.requires_grad), seed, scale)
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir) if base_name == "" else base_name
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def peft_merged(base_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """The independent reference: peft's own `merge_and_unload()` of the adapter, saved as a full model
    (with the base's tokenizer, when it has one)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(out)
    if (Path(base_dir) / "tokenizer.json").is_file():
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def make_lm_adapters(root: Path) -> dict[str, Any]:
    """A tiny llama base with a tokenizer, two LoRA adapters of it (`LM_LORAS`), a full fine-tune of the same
    base (with the tokenizer), peft's `merge_and_unload()` of each adapter, and a validation `.txt` of the
    tokenizer's words: {"base", "adapters", "full", "references", "val"}."""
    tokenizer = tiny_tokenizer()
    base = root / "base"
    build_base("llama").save_pretrained(base)
    tokenizer.save_pretrained(base)
    # Moved far enough (std 0.3) that each adapter's loss is clearly not the base's.
    adapters = [make_lora_adapter(base, root / f"lora{i}", options, seed=i, scale=0.3)
                for i, options in enumerate(LM_LORAS)]
    full = make_finetunes(root / "full", n=1, scale=0.05)[0]
    tokenizer.save_pretrained(full)
    references = [peft_merged(base, a, root / f"peft{i}") for i, a in enumerate(adapters)]
    val = root / "val.txt"
    val.write_text("".join(f"{text}\n" for text, _ in color_examples(12, seed=5)), encoding="utf-8")
    return {"base": base, "adapters": adapters, "full": full, "references": references, "val": val}


def upload_to_hub(token: str, repos: dict[str, Path]) -> list[str]:
    """Each folder uploaded to the test Hub under its repo id (created if needed); returns the repo ids."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    for repo_id, folder in repos.items():
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder)
    return list(repos)


# -- running the CLI and checking its errors ----------------------------------------------------

def run_cli(capsys: Any, *args: Any) -> tuple[int, str, str]:
    """Run `ame-hf ARGS` in this process: (exit code, stdout, stderr) of this run only."""
    from ame_hf.cli import main

    capsys.readouterr()  # drop what building the fixtures printed
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def score_table(text: str) -> dict[str, float]:
    """The `label  score` rows of a table printed by `ame-hf evaluate` / `ame-hf tune` (after its two header lines)."""
    import re

    rows = {}
    for line in text.splitlines()[2:]:
        if not line.strip():
            break  # a second table (held-out scores) follows
        # Columns are two or more spaces apart (labels have single spaces); the score is the last one.
        parts = re.split(r"\s{2,}", line.strip())
        rows[parts[0]] = float(parts[-1])
    return rows


def markdown_rows(markdown: str) -> list[tuple[str, float]]:
    """`(label, score)` of each body row of the Space's Markdown score tables: the label without its rank
    (`1. `), the first number after it."""
    import re

    rows = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) >= 2 and re.fullmatch(r"-?\d+\.\d+", cells[1]):
            rows.append((re.sub(r"^\d+\. ", "", cells[0]).replace("\\|", "|"), float(cells[1])))
    return rows


def assert_one_error_line(code: int, err: str, *needles: str, exit_code: int | None = None) -> str:
    """The check that a failure is exactly one clear line: a non-zero exit status (`exit_code` when given),
    no traceback, and one line on stderr, starting `ame-hf: error: ` and holding every needle. Returns it.

    Download progress bars (of ingredients fetched before the failure) and `INFO: ` log lines are not
    error output, so they are not counted.
    """
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and "%|" not in line and not line.startswith("INFO: ")]
    assert (code != 0 if exit_code is None else code == exit_code), f"exit status {code}: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("ame-hf: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def cli_error_line(capsys: Any, *args: Any, needles: Sequence[str] = (), exit_code: int | None = None,
                   max_seconds: float | None = None) -> str:
    """Run `ame-hf ARGS` in this process, `assert_one_error_line` on it, and return the line; with
    `max_seconds`, also that the failure came within that time (a bound on hanging, not a benchmark)."""
    started = time.perf_counter()
    code, _, err = run_cli(capsys, *args)
    elapsed = time.perf_counter() - started
    line = assert_one_error_line(code, err, *needles, exit_code=exit_code)
    if max_seconds is not None:
        assert elapsed < max_seconds, f"took {elapsed:.1f}s"
    return line


def default_ctrl_c() -> None:
    """A `preexec_fn` for a child the test interrupts with SIGINT: the default Ctrl-C handling, even when the tests
    run in a background job of a shell (`cmd &`), which starts them with SIGINT ignored (inherited by children):
    Python then never turns SIGINT into KeyboardInterrupt, and the child runs on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(*args: Any, **popen_kwargs: Any) -> subprocess.Popen:
    """`python -m ame_hf ARGS` started as a child process (stdout and stderr piped, as text), to interrupt
    (with `default_ctrl_c`)."""
    return subprocess.Popen([sys.executable, "-m", "ame_hf", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_ctrl_c, **popen_kwargs)


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0) -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def count_scored(monkeypatch, stop_at: str | None = None) -> list[str]:
    """Patch `tune`'s `evaluate_model` to record each model it scores (a folder, or the folder a model in memory
    is named after) and, with `stop_at`, raise RuntimeError("stopped") at the first whose name holds it (a run
    interrupted there). Returns the list it records into."""
    import ame_hf.tuning as tuning
    from ame_hf.evaluation import evaluate_model as real  # not a wrapper an earlier call left

    scored: list[str] = []

    def evaluate_model(model, *args, **kwargs):
        scored.append(str(getattr(model, "ame_candidate", model)))
        if stop_at is not None and stop_at in scored[-1]:
            raise RuntimeError("stopped")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(tuning, "evaluate_model", evaluate_model)
    return scored
