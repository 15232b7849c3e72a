"""Evidence for ame-hf's default AME settings: sweep optimizers and learning rates on the demo's
tiny experts (several trainings) and report the held-out loss relative to the uniform soup.

    python examples/defaults_sweep.py [--out DIR]   # default examples/_work/sweep (git-ignored); prints only
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from transformers import AutoModelForCausalLM

from ame_hf import AmeConfig, merge
from ame_hf.demo import build_experts, task_losses

CANDIDATES = {
    "adam rel 0.005": dict(optimizer="adam", relative_lr=0.005),
    "adam rel 0.01": dict(optimizer="adam", relative_lr=0.01),
    "adam rel 0.02": dict(optimizer="adam", relative_lr=0.02),
    "adam rel 0.05": dict(optimizer="adam", relative_lr=0.05),
    "adam rel 0.01 shuffle x3": dict(optimizer="adam", relative_lr=0.01, shuffle=True, epochs=3),
    "adam lr 1e-3": dict(optimizer="adam", lr=1e-3),
    "adam lr 1e-4": dict(optimizer="adam", lr=1e-4),
    "adagrad rel 0.01": dict(optimizer="adagrad", relative_lr=0.01),
    "rmsprop rel 0.01": dict(optimizer="rmsprop", relative_lr=0.01),
    "sgd lr 0.5 harmonic momentum 0.5": dict(optimizer="sgd", lr=0.5, schedule="harmonic",
                                             optimizer_args={"momentum": 0.5}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "_work" / "sweep",
                        help="work folder of the experts and merges (default examples/_work/sweep, git-ignored)")
    parser.add_argument("--trainings", default="60,120,240", help="fine-tuning steps of each expert set")
    args = parser.parse_args()
    deltas: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for steps in [int(s) for s in args.trainings.split(",")]:
        work = args.out / f"steps{steps}"
        experts = build_experts(work, steps)
        soup = merge(experts, work / "soup", AmeConfig.soup(), overwrite=True, progress=False)
        soup_loss = statistics.mean(task_losses(AutoModelForCausalLM.from_pretrained(soup.path)).values())
        print(f"\n{steps} steps/expert: soup mean loss {soup_loss:.3f}")
        for name, options in CANDIDATES.items():
            result = merge(experts, work / "cand", overwrite=True, progress=False, **options)
            loss = statistics.mean(task_losses(AutoModelForCausalLM.from_pretrained(result.path)).values())
            deltas[name].append(loss - soup_loss)
            print(f"  {name:34s} {loss:7.3f}  ({loss - soup_loss:+.3f} vs soup)")
    print("\nmean loss minus soup's (negative = better than the soup), per expert set:")
    for name, values in deltas.items():
        print(f"  {name:34s} " + " ".join(f"{v:+.3f}" for v in values) + f"   worst {max(values):+.3f}")


if __name__ == "__main__":
    main()
