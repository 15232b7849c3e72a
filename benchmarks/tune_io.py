"""What `tune` and the greedy soup (`merge --greedy-soup`) write and where their time goes: bytes written (the
process's write() calls, /proc/self/io `wchar`, and what reached the storage layer, `write_bytes`) and wall time
against the sum of the evaluations alone, with the candidates (and greedy-soup trials) built in memory (the default)
and written to disk (as before issue 24: `in_memory` disabled).

Ingredients: N copies of a Llama built from a config (a shared init plus seeded deltas) with a word-level tokenizer,
scored on random token text by the mean token loss. Results go to --out (default benchmarks/_work/tune_io/), never
to a tracked file:

    python benchmarks/tune_io.py                       # 4.2M and 17M parameters, 3 ingredients, default budget
    python benchmarks/tune_io.py --sizes 4m --budget 4 # quicker
    python benchmarks/tune_io.py --runs greedy         # the greedy soup alone
    python benchmarks/tune_io.py --sizes 134m --runs tune  # the run.py 134M shape (about 30 min here, both modes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_inputs import MODELS  # noqa: E402  (no torch at import time)

SIZES = {"4m": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688, vocab_size=2048),
         "17m": dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1376, vocab_size=4096),
         "134m": MODELS["small"]}  # run.py's 134M Llama: 12 heads, untied


def _io() -> dict[str, int]:
    values = {}
    with open("/proc/self/io", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            values[key] = int(value)
    return values


def build(root: Path, size: str, copies: int, docs: int) -> tuple[list[Path], Path]:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    fields = SIZES[size]
    words = [f"w{i}" for i in range(fields["vocab_size"])]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", eos_token="w1")
    config = LlamaConfig(**{"num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
                            "tie_word_embeddings": False, **fields})
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    paths = []
    for i in range(copies):
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        paths.append(root / f"{size}-ingredient{i}")
        model.save_pretrained(paths[-1])
        tokenizer.save_pretrained(paths[-1])
    gen = torch.Generator().manual_seed(1)
    text = root / f"{size}-val.txt"
    text.write_text("\n".join(" ".join(words[int(t)] for t in torch.randint(0, len(words), (128,), generator=gen))
                              for _ in range(docs)) + "\n")
    return paths, text


def run_tune(paths: list[Path], data: Path, out: Path, budget: int, in_memory: bool,
             greedy: bool = False) -> dict[str, float]:
    import ame_hf.in_memory
    import ame_hf.selection as selection
    import ame_hf.tuning as tuning

    spent = [0.0]

    def timed(real):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started
        return run

    saved = tuning.evaluate_model, selection.evaluate_model, tuning.merge_model, selection.merge_model
    tuning.evaluate_model, selection.evaluate_model = timed(saved[0]), timed(saved[1])
    if not in_memory:  # every candidate and greedy-soup trial written to disk, as before
        tuning.merge_model = selection.merge_model = lambda *args, **kwargs: None
    try:
        before, started = _io(), time.perf_counter()
        if greedy:
            result = selection.greedy_soup(paths, out, data=data, device="cpu")
        else:
            result = tuning.tune(paths, out, data=data, budget=budget, progress=False, device="cpu")
        wall, after = time.perf_counter() - started, _io()
    finally:
        tuning.evaluate_model, selection.evaluate_model, tuning.merge_model, selection.merge_model = saved
    output = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith(".safetensors"))
    what = ({"candidates": len(result.steps), "best": f"greedy soup (kept {result.kept})"} if greedy else
            {"candidates": len(result.candidates), "best": result.best.label})
    return {"wall_s": wall, "evaluations_s": spent[0], "wchar": after["wchar"] - before["wchar"],
            "write_bytes": after["write_bytes"] - before["write_bytes"], "output_bytes": output, **what}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4m,17m")
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--budget", type=int, default=12)
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--runs", default="tune,greedy", help="tune, greedy (merge --greedy-soup) or both")
    parser.add_argument("--modes", default="memory,disk", help="memory, disk or both (default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "_work" / "tune_io")
    args = parser.parse_args()
    import shutil

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        paths, data = build(args.out, size, args.copies, args.docs)
        for run in args.runs.split(","):
            for in_memory in [mode == "memory" for mode in args.modes.split(",")]:
                target = args.out / f"{size}-{run}-{'memory' if in_memory else 'disk'}"
                shutil.rmtree(target, ignore_errors=True)
                row = {"size": size, "run": run, "mode": "in memory" if in_memory else "on disk",
                       **run_tune(paths, data, target, args.budget, in_memory, greedy=run == "greedy")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = ["| model | run | candidates | wall s | evaluations s | merges etc. | written (wchar) | output |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = r["wall_s"] - r["evaluations_s"]
        lines.append(f"| {r['size']}, {r['mode']} | {r['run']} | {r['candidates']} | {r['wall_s']:.1f} | "
                     f"{r['evaluations_s']:.1f} | "
                     f"{extra:.1f} (+{100 * extra / r['evaluations_s']:.0f} %) | {r['wchar'] / 1e6:.1f} MB | "
                     f"{r['output_bytes'] / 1e6:.1f} MB |")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
