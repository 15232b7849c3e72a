"""`ame-hf demo` on a short run: its merged output is a usable text model (tokenizer included), and
the commands it prints to try next really run."""

from __future__ import annotations

import shlex
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO

import pytest

from ame_hf.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(working directory, printed output) of `ame-hf demo --steps 5`, run from a temporary directory."""
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        out = StringIO()
        with redirect_stdout(out):
            assert main(["demo", "--out", "ame-demo", "--steps", "5", "--quiet"]) == 0
    return root, out.getvalue()


def test_merged_demo_model_generates_text_and_tokenizes(demo):
    from transformers import AutoTokenizer, pipeline

    from ame_hf.demo import BASE_TOKEN, TASK_TOKEN

    root, _ = demo
    merged = root / "ame-demo" / "merged-ame"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer("<count> 3 4 5")["input_ids"] == [TASK_TOKEN["count"], 3, 4, 5]
    assert tokenizer("<skip3> <repeat> 19")["input_ids"] == [TASK_TOKEN["skip3"], TASK_TOKEN["repeat"], 19]
    assert tokenizer.convert_tokens_to_ids("<base>") == BASE_TOKEN == tokenizer.eos_token_id == tokenizer.pad_token_id
    assert tokenizer.decode([TASK_TOKEN["count"], 7, 8]).split() == ["<count>", "7", "8"]
    generated = pipeline("text-generation", model=str(merged))("<count> 3 4 5")[0]["generated_text"]
    assert generated.startswith("<count> 3 4 5 ") and len(generated.split()) > 4
    assert all(word in tokenizer.get_vocab() for word in generated.split()), generated
    for name in ("merged-soup", "base", "expert-count", "expert-skip3", "expert-repeat"):
        assert (root / "ame-demo" / name / "tokenizer.json").is_file(), name
    # a word the demo does not know reads as <base>, not an error ("Missing [UNK] token" before)
    assert tokenizer("hello 3")["input_ids"] == [BASE_TOKEN, 3]
    assert pipeline("text-generation", model=str(merged))("hello", max_new_tokens=3)[0]["generated_text"]


def test_demo_training_is_unchanged_by_the_tokenizer(demo):
    """Token ids are the ones the demo trained on: the tokenizer's encoding of a task batch is the batch."""
    import torch

    from ame_hf.demo import make_batch, tiny_tokenizer

    batch = make_batch("repeat", 4, torch.Generator().manual_seed(0))
    tokenizer = tiny_tokenizer()
    texts = [tokenizer.decode(row) for row in batch.tolist()]
    assert tokenizer(texts)["input_ids"] == batch.tolist()


def test_printed_next_commands_run(demo, monkeypatch, capsys):
    root, printed = demo
    commands = [line.strip() for line in printed.split("try next:")[1].splitlines() if line.strip()]
    assert [shlex.split(c)[:2] for c in commands] == [["python", "-c"], ["ame-hf", "merge"], ["ame-hf", "check"]]
    monkeypatch.chdir(root)
    for command in commands[1:]:
        assert main(shlex.split(command)[1:] + ["--quiet"]) == 0, command
    assert main(shlex.split(commands[1])[1:] + ["--quiet"]) == 0, "running it twice works too"
    python = shlex.split(commands[0])
    proc = subprocess.run([sys.executable, *python[1:]], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("<count> 3 4 5 ")
