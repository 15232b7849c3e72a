"""How many bytes `ame-hf check` downloads from the Hub, and how long it takes, on two ~500 MB repos.

    python benchmarks/check_bytes.py                 # two fp32 Llama repos of about 500 MB each
    python benchmarks/check_bytes.py --hidden 256    # smaller (a quick try)

Starts the tests' local Hub server (tests/hub_server/, real HTTP on 127.0.0.1, range requests as the
Hub serves them), uploads two fine-tunes of one Llama built from a config, then runs the installed
`ame-hf check` as a fresh process against it (fresh HF_HOME: nothing cached), and counts the body bytes
the server sent: for weight files (`*.safetensors`) and in all. Then the same for a pair that is not
compatible (other intermediate size), and for a full `ame-hf merge` of the compatible pair, which must
download everything. Prints a Markdown table. No network beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def build(root: Path, hidden: int, intermediate: int, seed: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=12,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    model.save_pretrained(root, max_shard_size="200MB")
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=640, help="hidden size (640: ~120M parameters, ~490 MB)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ame-check-bytes-"))
    from hub_server import HubServer

    hub = HubServer(work / "hub", tokens={"hf_bench": {"org"}}).start()
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(work / "home"), "HF_HUB_DISABLE_XET": "1",
           "HF_TOKEN": "hf_bench", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    os.environ.update({k: env[k] for k in ("HF_ENDPOINT", "HF_HUB_DISABLE_XET", "NO_PROXY", "no_proxy")},
                      HF_HUB_DISABLE_PROGRESS_BARS="1")
    try:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub.url, token="hf_bench")
        folders = {"org/bench-a": build(work / "a", args.hidden, 4 * args.hidden, 1),
                   "org/bench-b": build(work / "b", args.hidden, 4 * args.hidden, 2),
                   "org/bench-wide": build(work / "w", args.hidden, 4 * args.hidden + 256, 3)}
        weights = {}
        for repo_id, folder in folders.items():
            api.create_repo(repo_id, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=folder)
            weights[repo_id] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        exe = shutil.which("ame-hf", path=str(Path(sys.executable).parent)) or "ame-hf"
        rows = []
        for label, cmd, pair in (
            ("`check` (compatible pair)", ["check", "org/bench-a", "org/bench-b"], ("org/bench-a", "org/bench-b")),
            ("`check` (incompatible pair)", ["check", "org/bench-a", "org/bench-wide"], ("org/bench-a", "org/bench-wide")),
            ("failing `merge` (incompatible pair)", ["merge", "org/bench-a", "org/bench-wide", "--out", str(work / "x"),
                                                   "--quiet"], ("org/bench-a", "org/bench-wide")),
            ("`merge --optimizer sgd` (compatible pair)", ["merge", "org/bench-a", "org/bench-b", "--out",
                                                           str(work / "m"), "--optimizer", "sgd", "--quiet"],
             ("org/bench-a", "org/bench-b")),
        ):
            shutil.rmtree(work / "home", ignore_errors=True)  # nothing cached: every byte comes from the Hub
            seen = len(hub.requests)
            started = time.perf_counter()
            proc = subprocess.run([exe, *cmd], capture_output=True, text=True, env=env)
            wall = time.perf_counter() - started
            records = hub.requests[seen:]
            sent_weights = sum(r.bytes_sent for r in records if r.path.split("?")[0].endswith(".safetensors"))
            sent = sum(r.bytes_sent for r in records)
            total = sum(weights[r] for r in pair)
            rows.append((label, proc.returncode, total, sent_weights, sent, wall))
        print(f"two fp32 Llama repos, hidden {args.hidden}, 12 layers, vocab 32000: "
              f"{weights['org/bench-a'] / 1e6:.0f} MB of weights each, in "
              f"{len(list(folders['org/bench-a'].glob('*.safetensors')))} shard(s)\n")
        print("| command | exit | weights of the pair MB | weight bytes sent | all bytes sent | share of the weights | wall s |")
        print("|---|---|---|---|---|---|---|")
        for label, code, total, sent_weights, sent, wall in rows:
            print(f"| {label} | {code} | {total / 1e6:.0f} | {sent_weights:,} | {sent:,} | {sent_weights / total:.4%} "
                  f"| {wall:.1f} |")
    finally:
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
