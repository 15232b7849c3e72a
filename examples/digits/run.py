"""Paper-style AME example: tiny ViT experts fine-tuned on label-skewed shards of scikit-learn's 8x8
digits, merged by the soup, default AME, fixed AME settings and `tune`, tested clean and corrupted.

    python examples/digits/run.py [--quick] [--out DIR] [--seeds 0,1,2] [--report-only] [--update-results]

A run writes its data, models, results.json, RESULTS.md and accuracy_vs_n.png into --out (default
examples/_work/digits, git-ignored); the committed examples/digits/RESULTS.md and accuracy_vs_n.png are
rewritten only with --update-results (a full run). The plot needs matplotlib (`pip install matplotlib`);
without it the report is written without the plot.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

# Everything is built locally; never let transformers or evaluate try the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/, for _results
from _results import WORK, add_update_results, recorded_command, shown, source_commit  # noqa: E402

import ame_hf  # noqa: E402
from ame_hf.evaluation import LabelledData, evaluate_model, load_data  # noqa: E402
from ame_hf.tuning import DEFAULT_BUDGET, default_grid, tune  # noqa: E402

if TYPE_CHECKING:
    from transformers import ViTImageProcessor

HERE = Path(__file__).resolve().parent
TASK = "image-classification"
CLASSES = [str(c) for c in range(10)]

# The split never changes between runs; a seed varies the initialization, the shards and the
# training order, so several seeds show how much of a difference is noise.
SPLIT_SEED = 0
CORRUPTION_SEED = 1234
VAL_FRACTION, TEST_FRACTION = 0.10, 0.30
# A balanced slice of the training set pre-trains the shared base; the experts never see it.
PUBLIC_FRACTION = 0.20
DIRICHLET_ALPHA = 0.5
MIN_SHARD = 20          # a Dirichlet draw that leaves an expert fewer examples is drawn again
BATCH = 32
PATCH = 4               # 2x2 patches of 4x4 pixels: 5 tokens with the CLS token, fast on a CPU
BASE_LR = 2e-3
REFERENCE_STEPS, REFERENCE_LR = 300, 1e-3   # the base fine-tuned on all the experts' data together
NOISE_STD, BLUR_SIGMA = 0.25, 0.7
CORRUPTIONS = ("noise", "blur", "shift")

# The methods of the headline table and plot, in order; the two references are drawn as lines.
HEADLINE = ["experts (mean)", "best expert (val)", "soup", "default AME", "tune pick"]
BASE, REFERENCE = "base (shared init)", "one model, all data"


@dataclass(frozen=True)
class Plan:
    """What one run does; `--quick` shrinks it."""

    ns: tuple[int, ...] = (2, 4, 8)
    seeds: tuple[int, ...] = (0, 1, 2)
    base_steps: int = 60
    expert_epochs: int = 10
    # Two fine-tunings of the experts: step sizes 10x apart give expert sets whose spread differs
    # about 4x, the setting in which an absolute AME learning rate should stop transferring.
    regimes: dict[str, float] = field(default_factory=lambda: {"gentle": 3e-4, "strong": 3e-3})
    budget: int = DEFAULT_BUDGET  # tune's default: the 12 exploring candidates
    optimizers: tuple[str, ...] = ("adam", "adagrad", "rmsprop")
    relative: tuple[float, ...] = (0.005, 0.02, 0.1)
    absolute: tuple[float, ...] = (1e-4, 1e-3, 1e-2)

    def variants(self) -> dict[str, ame_hf.AmeConfig]:
        """Fixed AME settings: every optimizer with relative and with absolute learning rates."""
        out = {}
        for opt in self.optimizers:
            for c in self.relative:
                out[f"{opt} rel {c:g}"] = ame_hf.AmeConfig(optimizer=opt, relative_lr=c)
            for lr in self.absolute:
                out[f"{opt} lr {lr:g}"] = ame_hf.AmeConfig(optimizer=opt, lr=lr)
        return out


FULL = Plan()
QUICK = Plan(ns=(2, 8), seeds=(0,), budget=4)


class Phases:
    """Wall time per phase (train, merge, tune, evaluate), for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


# -- data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    images: np.ndarray   # uint8 (n, 8, 8): the one representation behind both PNG files and tensors
    labels: np.ndarray   # int (n,)

    def subset(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.labels[index])


def load_splits() -> dict[str, Split]:
    """Stratified public / private (training), val and test splits of the 1797 bundled digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    every = Split(np.round(digits.images * 255.0 / 16.0).astype(np.uint8), digits.target)

    def cut(index: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        return train_test_split(index, test_size=fraction, stratify=every.labels[index], random_state=SPLIT_SEED)

    rest, test = cut(np.arange(len(every.labels)), TEST_FRACTION)
    train, val = cut(rest, VAL_FRACTION / (1 - TEST_FRACTION))
    private, public = cut(train, PUBLIC_FRACTION)
    return {name: every.subset(index) for name, index in
            (("public", public), ("private", private), ("val", val), ("test", test))}


def corrupt(split: Split) -> dict[str, Split]:
    """The test set under Gaussian noise, Gaussian blur and a one-pixel shift (fixed seed)."""
    rng = np.random.default_rng(CORRUPTION_SEED)
    x = split.images.astype(np.float64)
    noisy = x + rng.normal(0.0, NOISE_STD * 255.0, size=x.shape)
    blurred = ndimage.gaussian_filter(x, sigma=(0, BLUR_SIGMA, BLUR_SIGMA))
    # One pixel in one of the 8 directions per image; what moves in is background.
    moves = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)])
    shifted = np.stack([ndimage.shift(img, moves[k], order=0, cval=0.0)
                        for img, k in zip(x, rng.integers(len(moves), size=len(x)))])

    def to_u8(a: np.ndarray) -> np.ndarray:
        return np.clip(np.round(a), 0, 255).astype(np.uint8)

    return {"noise": Split(to_u8(noisy), split.labels), "blur": Split(to_u8(blurred), split.labels),
            "shift": Split(to_u8(shifted), split.labels)}


def write_image_folder(split: Split, root: Path) -> Path:
    """`root/<label>/<i>.png`, the folder layout `ame_hf.evaluation.load_data` reads."""
    for i, (img, label) in enumerate(zip(split.images, split.labels)):
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(root / CLASSES[label] / f"{i:04d}.png")
    return root


def write_jsonl(split: Split, path: Path) -> Path:
    """PNG files beside a JSONL of `{"image", "label"}` rows, the other layout `load_data` reads."""
    (path.parent / path.stem).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, label) in enumerate(zip(split.images, split.labels)):
        name = f"{path.stem}/{i:04d}.png"
        Image.fromarray(img, mode="L").save(path.parent / name)
        rows.append(json.dumps({"image": name, "label": CLASSES[label]}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def dirichlet_shards(labels: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint shards: each class is divided among the experts in Dirichlet(alpha) proportions."""
    while True:
        shards: list[list[int]] = [[] for _ in range(n)]
        for c in range(len(CLASSES)):
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([DIRICHLET_ALPHA] * n))[:-1] * len(members)).astype(int)
            for shard, part in zip(shards, np.split(members, cuts)):
                shard.extend(part.tolist())
        if min(map(len, shards)) >= MIN_SHARD:
            return [np.sort(np.array(s)) for s in shards]


# -- models --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pixels:
    """Normalization shared by the saved image processor and the direct forward passes."""

    mean: float
    std: float

    def processor(self) -> ViTImageProcessor:
        # Imported here, after main() has quieted transformers' notice about torchvision.
        from transformers import ViTImageProcessor

        # The image-classification pipeline converts every image to RGB, so the model takes three
        # identical channels although the PNGs are grayscale.
        return ViTImageProcessor(do_resize=False, size={"height": 8, "width": 8}, do_rescale=True,
                                 do_normalize=True, image_mean=[self.mean] * 3, image_std=[self.std] * 3)

    def tensor(self, images: np.ndarray) -> torch.Tensor:
        x = (torch.from_numpy(images).float() / 255.0 - self.mean) / self.std
        return x[:, None].expand(-1, 3, -1, -1).contiguous()


def save(model: ViTForImageClassification, pixels: Pixels, out: Path) -> Path:
    model.save_pretrained(out)
    pixels.processor().save_pretrained(out)
    return out


def build_init(seed: int, pixels: Pixels, out: Path) -> Path:
    """A random tiny ViT (about 40k parameters) with the digit labels."""
    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=PATCH, num_channels=3, hidden_size=48, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=96, num_labels=len(CLASSES),
                       id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    return save(ViTForImageClassification(config), pixels, out)


def train(start: Path, data: Split, steps: int, lr: float, seed: int, pixels: Pixels, out: Path) -> Path:
    """Train a copy of `start` with AdamW for `steps` batches, cycling through shuffled epochs."""
    torch.manual_seed(seed)
    x, y = pixels.tensor(data.images), torch.from_numpy(data.labels).long()
    model = ViTForImageClassification.from_pretrained(start).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < min(BATCH, len(y)):
            order = torch.randperm(len(y))
        batch, order = order[:BATCH], order[BATCH:]
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x[batch]).logits, y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save(model, pixels, out)


@torch.no_grad()
def accuracies(model_dir: Path, sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Accuracy on every set, one batched forward pass each: fast enough for dozens of variants."""
    model = ViTForImageClassification.from_pretrained(model_dir).eval()
    return {name: float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())
            for name, (x, y) in sets.items()}


def expert_spread(experts: Sequence[Path]) -> dict[str, float]:
    """How far the experts are from their mean (overall and median per-tensor RMS): the scale a
    relative learning rate multiplies and an absolute one ignores."""
    from safetensors.torch import load_file

    states = [load_file(str(e / "model.safetensors")) for e in experts]
    per_tensor, total, count = [], 0.0, 0
    for name, first in states[0].items():
        if not first.is_floating_point():
            continue
        stack = torch.stack([s[name].double() for s in states])
        squared = (stack - stack.mean(0)).pow(2)
        per_tensor.append(float(squared.mean().sqrt()))
        total, count = total + float(squared.sum()), count + squared.numel()
    return {"rms": (total / count) ** 0.5, "median_tensor_rms": statistics.median(per_tensor)}


# -- one seed ------------------------------------------------------------------------------------
class SeedRun:
    """Everything for one seed: the base, then for each N and fine-tuning the experts, every merge,
    tune, and the evaluation of each model. Collects result rows and notes for the report."""

    def __init__(self, seed: int, plan: Plan, splits: dict[str, Split], pixels: Pixels, val: LabelledData,
                 test: LabelledData, out: Path, phases: Phases) -> None:
        self.seed, self.plan, self.splits, self.pixels = seed, plan, splits, pixels
        self.val, self.test, self.work, self.phases = val, test, out / f"seed{seed}", phases
        sets = {"val": splits["val"], "clean": splits["test"], **corrupt(splits["test"])}
        self.tensors = {k: (pixels.tensor(s.images), torch.from_numpy(s.labels).long()) for k, s in sets.items()}
        self.rows: list[dict[str, Any]] = []
        self.notes: dict[str, Any] = {"seed": seed, "spread": {}, "tune": {}, "pipeline_check": [], "shards": {}}

    def record(self, regime: str, n: int, method: str, model_dir: Path) -> dict[str, Any]:
        with self.phases("evaluate"):
            self.rows.append({"seed": self.seed, "regime": regime, "n": n, "method": method,
                              **accuracies(model_dir, self.tensors)})
        return self.rows[-1]

    def run(self) -> None:
        private = self.splits["private"]
        with self.phases("train"):
            base = build_init(self.seed, self.pixels, self.work / "init")
            if self.plan.base_steps:
                base = train(base, self.splits["public"], self.plan.base_steps, BASE_LR, self.seed, self.pixels,
                             self.work / "base")
            reference = train(base, private, REFERENCE_STEPS, REFERENCE_LR, self.seed, self.pixels,
                              self.work / "reference")
        # Neither depends on the fine-tuning or on N.
        self.record("", 0, BASE, base)
        self.record("", 0, REFERENCE, reference)
        for n in self.plan.ns:
            # The same shards for every fine-tuning, so that only the step size differs.
            shards = dirichlet_shards(private.labels, n, np.random.default_rng([self.seed, n]))
            self.notes["shards"][n] = [np.bincount(private.labels[s], minlength=len(CLASSES)).tolist()
                                       for s in shards]
            for regime, lr in self.plan.regimes.items():
                experts = self.fine_tune(base, shards, lr, self.work / regime / f"n{n}")
                self.merge_and_evaluate(regime, n, experts, self.work / regime / f"n{n}")

    def fine_tune(self, base: Path, shards: list[np.ndarray], lr: float, work: Path) -> list[Path]:
        private = self.splits["private"]
        with self.phases("train"):
            # Epochs, not steps: an expert with a smaller shard takes fewer steps, as in practice.
            return [train(base, private.subset(s), self.plan.expert_epochs * -(-len(s) // BATCH), lr,
                          1000 * self.seed + 10 * len(shards) + i, self.pixels, work / f"expert{i}")
                    for i, s in enumerate(shards)]

    def merge_and_evaluate(self, regime: str, n: int, experts: list[Path], work: Path) -> None:
        self.notes["spread"][f"{regime} {n}"] = expert_spread(experts)
        expert_rows = [self.record(regime, n, f"expert {i}", e) for i, e in enumerate(experts)]
        best = max(range(n), key=lambda i: (expert_rows[i]["val"], -i))  # ties: the first
        self.rows.append({"seed": self.seed, "regime": regime, "n": n, "method": "experts (mean)",
                          **{k: statistics.mean(r[k] for r in expert_rows) for k in self.tensors}})
        self.rows.append({**expert_rows[best], "method": "best expert (val)"})

        with self.phases("merge"):
            soup = ame_hf.merge(experts, work / "soup", ame_hf.AmeConfig.soup(), overwrite=True, progress=False)
            default = ame_hf.merge(experts, work / "ame-default", ame_hf.AmeConfig(), overwrite=True,
                                   progress=False)
        self.record(regime, n, "soup", soup.path)
        self.record(regime, n, "default AME", default.path)
        for label, cfg in self.plan.variants().items():
            if cfg.resolved() == default.config:
                path = default.path
            else:
                with self.phases("merge"):
                    path = ame_hf.merge(experts, work / "variant", cfg, overwrite=True, progress=False).path
            self.record(regime, n, label, path)

        with self.phases("tune"):
            picked = tune(experts, work / "tune", data=self.val, task=TASK, budget=self.plan.budget,
                          grid=default_grid(), overwrite=True, progress=False)
        # A winning ingredient is labelled by its path; the expert's number says the same, shorter.
        label = picked.best.label if picked.best.config is not None else f"expert {picked.best.ingredient}"
        self.notes["tune"][f"{regime} {n}"] = {"pick": label, "val": picked.best.score}
        self.record(regime, n, "tune pick", picked.path)

        # The real code path: a transformers pipeline over the PNG test set must agree with the
        # direct forward passes used for everything else.
        here = [r for r in self.rows if (r["regime"], r["n"]) == (regime, n)]
        with self.phases("evaluate"):
            for method, path in (("soup", soup.path), ("tune pick", picked.path)):
                direct = next(r["clean"] for r in here if r["method"] == method)
                self.notes["pipeline_check"].append({"regime": regime, "n": n, "method": method, "direct": direct,
                                                     "pipeline": evaluate_model(str(path), self.test, TASK)})
        print(f"  seed {self.seed}, {regime}, N={n}: "
              + ", ".join(f"{r['method']} {100 * r['clean']:.1f}" for r in here if r["method"] in HEADLINE),
              flush=True)


# -- report --------------------------------------------------------------------------------------
Cell = tuple[str, int]   # (fine-tuning regime, N); ("", 0) for the base and the reference


def score(row: dict[str, Any], key: str) -> float:
    """One accuracy of a row: a set's name, or `corrupted` (the mean over the corruptions)."""
    return statistics.mean(row[k] for k in CORRUPTIONS) if key == "corrupted" else row[key]


def per_seed(rows: list[dict[str, Any]], method: str, cell: Cell, key: str = "clean") -> dict[int, float]:
    if method in (BASE, REFERENCE):
        cell = ("", 0)
    return {r["seed"]: score(r, key) for r in rows if r["method"] == method and (r["regime"], r["n"]) == cell}


def mean_acc(rows: list[dict[str, Any]], method: str, cell: Cell, key: str = "clean") -> float:
    return statistics.mean(per_seed(rows, method, cell, key).values())


def gains(rows: list[dict[str, Any]], method: str, other: str, cell: Cell, key: str = "clean") -> list[float]:
    """Per-seed accuracy of `method` minus `other`'s, in points."""
    mine, theirs = per_seed(rows, method, cell, key), per_seed(rows, other, cell, key)
    return [100 * (mine[s] - theirs[s]) for s in sorted(theirs)]


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def signed(x: float) -> str:
    return f"{x:+.1f}"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(rows: list[dict[str, Any]], plan: Plan, path: Path, source: str) -> bool:
    """Accuracy against N: a row of panels per fine-tuning regime, clean and corrupted; the fixed
    AME settings as two bands, relative and absolute learning rates. `source` (the command and commit)
    goes into the PNG's text. False, with a one-line message, where matplotlib is not installed."""
    if not have_matplotlib():
        print(f"{path.name} not drawn: it needs matplotlib (pip install matplotlib), which ame-hf does not "
              "require", flush=True)
        return False
    import matplotlib
    from PIL.PngImagePlugin import PngInfo

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"experts (mean)": ("0.55", "--", "o"), "best expert (val)": ("0.25", "-", "o"),
              "soup": ("tab:blue", "-", "s"), "default AME": ("tab:orange", "-", "^"),
              "tune pick": ("tab:green", "-", "D")}
    regimes = list(plan.regimes)
    fig, axes = plt.subplots(len(regimes), 2, figsize=(8.4, 0.6 + 2.7 * len(regimes)), squeeze=False,
                             sharex=True)
    for row_axes, regime in zip(axes, regimes):
        for ax, key in zip(row_axes, ("clean", "corrupted")):
            for form, color in ((" lr ", "tab:purple"), (" rel ", "tab:orange")):
                labels = [v for v in plan.variants() if form in v]
                band = [[100 * mean_acc(rows, v, (regime, n), key) for v in labels] for n in plan.ns]
                name = "absolute lr" if form == " lr " else "relative_lr"
                ax.fill_between(plan.ns, [min(b) for b in band], [max(b) for b in band], color=color, alpha=0.15,
                                linewidth=0, label=f"range of the {len(labels)} {name} settings")
            for method in HEADLINE:
                color, line, marker = styles[method]
                ax.plot(plan.ns, [100 * mean_acc(rows, method, (regime, n), key) for n in plan.ns], color=color,
                        linestyle=line, marker=marker, markersize=4, label=method)
            for method, color, line in ((REFERENCE, "k", ":"), (BASE, "tab:red", "-.")):
                ax.axhline(100 * mean_acc(rows, method, ("", 0), key), color=color, linestyle=line, linewidth=1,
                           label=method)
            ax.set_title(f"{'clean' if key == 'clean' else 'corrupted'} test, {regime} fine-tuning "
                         f"(lr {plan.regimes[regime]:g})", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_xticks(plan.ns, [str(n) for n in plan.ns])
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
        row_axes[0].set_ylabel("accuracy %", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel(f"number of experts N (mean of {len(plan.seeds)} seed{'s' if len(plan.seeds) > 1 else ''})",
                      fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    # A 64-colour palette keeps the committed image small without visible loss.
    text = PngInfo()
    text.add_text("Source", source)
    Image.open(buffer).convert("RGB").quantize(colors=64).save(path, optimize=True, pnginfo=text)
    return True


def at_commit(meta: dict[str, Any]) -> str:
    """` at ame-hf commit abc1234`, or nothing for results recorded before commits were."""
    return f" at ame-hf commit {meta['commit']}" if meta.get("commit") else ""


def report(rows: list[dict[str, Any]], notes: list[dict[str, Any]], plan: Plan, meta: dict[str, Any],
           png: Path | None) -> str:
    """RESULTS.md: setup, tables, a reading computed from the numbers, checks and timings."""
    cells = [(regime, n) for regime in plan.regimes for n in plan.ns]
    runs = len(plan.seeds) * len(cells)
    sizes = meta["sizes"]
    head = lambda c: f"{c[0]} N={c[1]}"  # noqa: E731
    hidden = max(abs(statistics.mean(gains(rows, "default AME", "soup", c, key)))
                 for c in cells for key in ("clean", "corrupted"))
    figure = ["(No plot: matplotlib was not installed for this run.)", ""]
    if png is not None:
        figure = [f"![accuracy against N]({png.name})", "",
                  f"Lines that seem missing lie under others: default AME is within {hidden:.1f} points of the soup "
                  "at every point of the plot.", ""]
    lines = [
        "# Digits: AME on tiny ViT experts",
        "",
        f"Generated by `{meta['command']}`{at_commit(meta)} on {meta['date']} in {meta['seconds']:.0f} s "
        f"({meta['machine']}). "
        f"Seeds {', '.join(map(str, plan.seeds))}; data split seed {SPLIT_SEED}, corruption seed "
        f"{CORRUPTION_SEED}; ame-hf {ame_hf.__version__}, torch {torch.__version__}.",
        "",
        f"**Setup.** Per seed, one random tiny ViT (2 layers, width 48, {PATCH}x{PATCH}-pixel patches, ~40k "
        f"parameters) is pre-trained for {plan.base_steps} steps on a balanced public slice of {sizes['public']} "
        "training digits: the shared **base**. N experts fine-tune the base with AdamW for "
        f"{plan.expert_epochs} epochs each on "
        f"disjoint shards of the other {sizes['private']} training digits; each class is divided among the experts "
        f"in Dirichlet(alpha={DIRICHLET_ALPHA}) proportions (the same shards for both fine-tunings). Two "
        "fine-tunings give two expert sets whose distance from one another differs by a factor of about "
        f"{spread_ratio(notes, plan):.0f}: " + ", ".join(f"**{k}** (lr {v:g})" for k, v in plan.regimes.items())
        + f". Validation: {sizes['val']} digits (`tune`, and naming the best expert). Test: {sizes['test']} "
        f"digits, clean and corrupted (Gaussian noise of std {NOISE_STD} of full scale, Gaussian blur of sigma "
        f"{BLUR_SIGMA} px, a random one-pixel shift). `{REFERENCE}`: the base fine-tuned on all "
        f"{sizes['private']} expert digits together ({REFERENCE_STEPS} steps), a reference that needs the data. "
        f"Accuracy in %, mean over seeds; one test digit is {100 / sizes['test']:.2f} points.",
        "",
        *figure,
        "## Accuracy",
        "",
        "| fine-tuning | method | " + " | ".join(f"clean N={n}" for n in plan.ns) + " | "
        + " | ".join(f"corrupted N={n}" for n in plan.ns) + " |",
        "|---" * (2 + 2 * len(plan.ns)) + "|",
    ]
    for method in (BASE, REFERENCE):
        lines.append(f"| — | {method} | " + " | ".join(pct(mean_acc(rows, method, ("", 0))) for _ in plan.ns)
                     + " | " + " | ".join(pct(mean_acc(rows, method, ("", 0), "corrupted")) for _ in plan.ns) + " |")
    for regime in plan.regimes:
        for method in HEADLINE:
            lines.append(f"| {regime} | {method} | "
                         + " | ".join(pct(mean_acc(rows, method, (regime, n))) for n in plan.ns) + " | "
                         + " | ".join(pct(mean_acc(rows, method, (regime, n), "corrupted")) for n in plan.ns) + " |")
    lines += ["", f"Per corruption (N = {' / '.join(map(str, plan.ns))}):", "",
              "| fine-tuning | method | " + " | ".join(CORRUPTIONS) + " |", "|---" * (2 + len(CORRUPTIONS)) + "|"]
    for regime in plan.regimes:
        for method in HEADLINE:
            lines.append(f"| {regime} | {method} | " + " | ".join(
                " / ".join(pct(mean_acc(rows, method, (regime, n), c)) for n in plan.ns) for c in CORRUPTIONS) + " |")

    lines += ["", "## Fixed AME settings against the soup", "",
              "Clean test accuracy minus the soup's, in points, mean over seeds; `worst`: the worst single run "
              f"(seed, fine-tuning, N) of {runs}; `wins`: runs above the soup; `corrupted`: the mean difference "
              "on the corrupted sets over all runs. `adam rel 0.005` is the default.", "",
              "| setting | " + " | ".join(head(c) for c in cells) + " | worst | wins | corrupted |",
              "|---" * (4 + len(cells)) + "|"]
    summary: dict[str, dict[str, float]] = {}
    for label in plan.variants():
        by_cell = {c: gains(rows, label, "soup", c) for c in cells}
        every = [d for v in by_cell.values() for d in v]
        corrupted = [d for c in cells for d in gains(rows, label, "soup", c, "corrupted")]
        summary[label] = {"worst": min(every), "wins": sum(d > 0 for d in every),
                          "worst_mean": min(statistics.mean(v) for v in by_cell.values())}
        lines.append(f"| {label} | " + " | ".join(signed(statistics.mean(by_cell[c])) for c in cells)
                     + f" | {signed(min(every))} | {summary[label]['wins']}/{runs} | "
                     + f"{signed(statistics.mean(corrupted))} |")

    lines += ["", "Best learning rate of each optimizer per column (highest mean clean test accuracy), and the "
              "scale that a relative learning rate multiplies, the experts' spread around their mean:", "",
              "| | " + " | ".join(head(c) for c in cells) + " |", "|---" * (1 + len(cells)) + "|"]
    best_lr: dict[str, list[str]] = {}
    for opt in plan.optimizers:
        for form, values in (("rel", plan.relative), ("lr", plan.absolute)):
            labels = [f"{opt} {form} {v:g}" for v in values]
            best_lr[f"{opt} {form}"] = [max(labels, key=lambda lab: mean_acc(rows, lab, c)).split()[-1]
                                        for c in cells]
            lines.append(f"| {opt}, best {'relative_lr' if form == 'rel' else 'absolute lr'} | "
                         + " | ".join(best_lr[f"{opt} {form}"]) + " |")
    for key, name in (("median_tensor_rms", "median per-tensor"), ("rms", "overall")):
        lines.append(f"| {name} RMS(expert − mean) | " + " | ".join(
            f"{statistics.mean(nt['spread'][f'{r} {n}'][key] for nt in notes):.2g}" for r, n in cells) + " |")

    lines += ["", "## What `tune` picked", "",
              f"Budget {plan.budget}: the soup, the greedy soup, each expert and the first {plan.budget} settings of "
              "`default_grid()`, scored on the validation digits.", "",
              "| seed | fine-tuning | " + " | ".join(f"N={n}" for n in plan.ns) + " |",
              "|---" * (2 + len(plan.ns)) + "|"]
    for nt in notes:
        for regime in plan.regimes:
            lines.append(f"| {nt['seed']} | {regime} | " + " | ".join(
                f"{nt['tune'][f'{regime} {n}']['pick']} (val {pct(nt['tune'][f'{regime} {n}']['val'])})"
                for n in plan.ns) + " |")

    checks = [c for nt in notes for c in nt["pipeline_check"]]
    gap = max(abs(c["pipeline"] - c["direct"]) for c in checks)
    lines += ["", "## Reading (computed from the tables above)", "",
              *reading(rows, notes, plan, cells, summary, sizes), "", "## Checks and timings", "",
              f"- Clean test accuracy through `ame_hf.evaluation.evaluate_model` (a transformers "
              f"image-classification pipeline over the PNG test set, read by `load_data` from JSONL) against the "
              f"direct batched forward passes behind every table: {len(checks)} models (each soup and tune pick), "
              f"largest difference {100 * gap:.2f} points. `tune` read the validation PNGs as an image folder.",
              "- Seconds per phase: " + ", ".join(f"{k} {v:.0f}" for k, v in meta["phases"].items())
              + f"; total {meta['seconds']:.0f} s with torch.set_num_threads({meta['threads']}).", ""]
    return "\n".join(lines)


def spread_ratio(notes: list[dict[str, Any]], plan: Plan) -> float:
    """How many times farther apart the experts of the last regime are than those of the first."""
    first, last = list(plan.regimes)[0], list(plan.regimes)[-1]
    mean = lambda r: statistics.mean(nt["spread"][f"{r} {n}"]["rms"] for nt in notes for n in plan.ns)  # noqa: E731
    return mean(last) / mean(first)


def reading(rows: list[dict[str, Any]], notes: list[dict[str, Any]], plan: Plan, cells: list[Cell],
            summary: dict[str, dict[str, float]], sizes: dict[str, int]) -> list[str]:
    """The reading, computed from the numbers so that a rerun cannot keep a stale claim."""
    runs = len(plan.seeds) * len(cells)

    def versus(method: str, other: str, key: str = "clean") -> tuple[float, int, float]:
        every = [d for c in cells for d in gains(rows, method, other, c, key)]
        return statistics.mean(every), sum(d > 0 for d in every), min(every)

    out = []
    d, wins, _ = versus("soup", "best expert (val)")
    dc = versus("soup", "best expert (val)", "corrupted")[0]
    over_base = statistics.mean(100 * (mean_acc(rows, "soup", c) - mean_acc(rows, BASE, c)) for c in cells)
    out.append(f"- **Soup vs experts.** The soup averages {signed(d)} points over the validation-chosen best expert "
               f"on clean test (above it in {wins}/{runs} runs), {signed(dc)} on the corrupted sets, and "
               f"{signed(over_base)} over the base the experts started from.")
    d, wins, worst = versus("default AME", "soup")
    dc = versus("default AME", "soup", "corrupted")[0]
    one_digit = 100 / sizes["test"]
    verdict = ("It does not beat the soup." if d <= 0 else
               "Not a gain that matters: less than one test digit per run on average." if d < one_digit else
               "A gain over the soup." if worst >= 0 else "A gain on average, not in every run.")
    out.append(f"- **Default AME vs soup.** {signed(d)} points clean, {signed(dc)} corrupted on average; above the "
               f"soup in {wins}/{runs} runs, worst run {signed(worst)}. {verdict}")
    always = [lab for lab, s in summary.items() if s["worst_mean"] > 0]
    safe = [lab for lab, s in summary.items() if s["worst_mean"] > -1]
    loser = min(summary, key=lambda lab: summary[lab]["worst"])
    out.append(f"- **Fixed settings.** {len(always)} of {len(summary)} beat the soup in every column on the seed "
               "mean" + (f" ({', '.join(always)})" if always else "") + f"; {len(safe)} stayed within 1 point of "
               f"it in every column. The largest single-run loss was {signed(summary[loser]['worst'])} points "
               f"({loser}).")

    def largest_safe(form: str, values: tuple[float, ...]) -> str:
        """Per optimizer, the largest value whose every smaller value is within 1 point everywhere."""
        out = []
        for opt in plan.optimizers:
            ok = [v for i, v in enumerate(values) if all(f"{opt} {form} {w:g}" in safe for w in values[:i + 1])]
            out.append(f"{opt} {ok[-1]:g}" if ok else f"{opt} none")
        return ", ".join(out)

    def same(form: str) -> int:
        values = plan.relative if form == "rel" else plan.absolute
        best = [{max(values, key=lambda v: mean_acc(rows, f"{opt} {form} {v:g}", c)) for c in cells}
                for opt in plan.optimizers]
        return sum(len(b) == 1 for b in best)

    rel_safe = [lab for lab in safe if " rel " in lab]
    out.append(f"- **relative_lr across fine-tunings and N.** Within 1 point of the soup in every column: "
               f"{len(rel_safe)} of {len(plan.optimizers) * len(plan.relative)} relative settings and "
               f"{len(safe) - len(rel_safe)} of {len(plan.optimizers) * len(plan.absolute)} absolute ones. "
               f"Largest safe value: relative_lr {largest_safe('rel', plan.relative)}; absolute lr "
               f"{largest_safe('lr', plan.absolute)}. The best value was the same in every column for "
               f"{same('rel')}/{len(plan.optimizers)} optimizers with relative_lr and {same('lr')}/"
               f"{len(plan.optimizers)} with absolute lr.")

    def moves(labels: list[str], axis: int) -> float:
        """Mean over settings of how far a setting's gain over the soup moves along one axis
        (0: between fine-tunings at the same N, 1: between Ns in the same fine-tuning), in points."""
        shifts = []
        for label in labels:
            groups: dict[Any, list[float]] = {}
            for c in cells:
                groups.setdefault(c[1 - axis], []).append(statistics.mean(gains(rows, label, "soup", c)))
            shifts += [max(v) - min(v) for v in groups.values()]
        return statistics.mean(shifts)

    if len(plan.regimes) > 1 and len(plan.ns) > 1:
        # A relative_lr c is an lr of c x the per-tensor spread; compare the forms only where their
        # step sizes overlap, or the absolute grid's largest steps decide the comparison alone.
        spreads = [nt["spread"][f"{r} {n}"]["median_tensor_rms"] for nt in notes for r, n in cells]
        low, high = min(plan.relative) * min(spreads), max(plan.relative) * max(spreads)
        rel = [lab for lab in summary if " rel " in lab]
        absolute = [lab for lab in summary if " lr " in lab and low <= float(lab.split()[-1]) <= high]
        if absolute:
            out.append(f"- **Like for like.** The relative grid means absolute steps of {low:.2g} to {high:.2g} "
                       f"here; absolute settings outside that range have no relative counterpart, so the counts "
                       f"above favour the relative form. Within it ({len(absolute)} absolute settings), a "
                       f"setting's gain over the soup moved by {moves(rel, 0):.1f} points (relative) vs "
                       f"{moves(absolute, 0):.1f} (absolute) between the two fine-tunings at the same N, and by "
                       f"{moves(rel, 1):.1f} vs {moves(absolute, 1):.1f} across N in the same fine-tuning "
                       "(mean over settings of best minus worst).")
    rel_n, abs_n = len(rel_safe), len(safe) - len(rel_safe)
    if always:
        answer = f"Some settings beat the soup in every column: {', '.join(always)}."
    else:
        answer = ("No setting of either form beat the soup in every column, so relative_lr did not make a "
                  "*winning* setting carry across fine-tunings and N; "
                  + ("it did make more settings safe everywhere" if rel_n > abs_n else "nor did it make more "
                     "settings safe") + f" ({rel_n} relative vs {abs_n} absolute).")
    out.append(f"- **So.** {answer}")
    d, wins, worst = versus("tune pick", "soup")
    d2, wins2, _ = versus("tune pick", "best expert (val)")
    dc = versus("tune pick", "soup", "corrupted")[0]
    picks = [(nt["seed"], cell) for nt in notes for cell in cells
             if nt["tune"][f"{cell[0]} {cell[1]}"]["pick"].startswith("expert")]
    cost = [100 * (per_seed(rows, "tune pick", c)[sd] - per_seed(rows, "soup", c)[sd]) for sd, c in picks]
    lead = [sizes["val"] * (per_seed(rows, "tune pick", c, "val")[sd] - per_seed(rows, "soup", c, "val")[sd])
            for sd, c in picks]
    out.append(f"- **tune (selection on validation).** {signed(d)} points over the soup on clean test ({wins}/{runs} "
               f"runs above it, worst {signed(worst)}), {signed(d2)} over the best expert ({wins2}/{runs}); "
               f"{signed(dc)} over the soup on the corrupted sets."
               + (f" It chose a single expert in {len(picks)}/{runs} runs, each ahead of the soup by "
                  f"{min(lead):.0f} to {max(lead):.0f} of the {sizes['val']} validation digits; on test those picks "
                  f"averaged {signed(statistics.mean(cost))} points against the soup."
                  if picks else ""))
    return out


# -- main ----------------------------------------------------------------------------------------
def write_report(results: dict[str, Any], report_dir: Path) -> Path:
    """RESULTS.md and accuracy_vs_n.png (when matplotlib is installed) from the contents of results.json."""
    plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["plan"].items()})
    meta = results["meta"]
    report_dir.mkdir(parents=True, exist_ok=True)
    png = report_dir / "accuracy_vs_n.png"
    drawn = plot(results["rows"], plan, png, meta["command"] + at_commit(meta))
    target = report_dir / "RESULTS.md"
    target.write_text(report(results["rows"], results["notes"], plan, meta, png if drawn else None),
                      encoding="utf-8")
    return target


def report_dirs(out: Path, update_results: bool) -> list[Path]:
    """Where a report goes: the work folder, and the committed examples/digits/ with --update-results."""
    return [out, HERE] if update_results else [out]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="one seed, N in {2, 8}, tune budget 4 (about a minute)")
    parser.add_argument("--out", type=Path,
                        help="work folder: data, models, results.json, RESULTS.md and the plot (default "
                             "examples/_work/digits, or examples/_work/digits-quick with --quick; git-ignored)")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild RESULTS.md and the plot from --out/results.json without training")
    add_update_results(parser, "examples/digits/RESULTS.md and accuracy_vs_n.png (a full run; needs matplotlib)")
    parser.add_argument("--base-steps", type=int,
                        help="pre-training steps of the shared base (default 60); 0: the experts start from the "
                             "random initialization itself")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is fastest for these tiny models")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.seeds:
        plan = replace(plan, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.base_steps is not None:
        plan = replace(plan, base_steps=args.base_steps)
    out = args.out or WORK / ("digits-quick" if args.quick else "digits")
    if args.update_results and not have_matplotlib():
        parser.error("--update-results redraws the committed accuracy_vs_n.png, which needs matplotlib: "
                     "pip install matplotlib")
    if args.report_only:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        if args.update_results and results["meta"].get("quick", False):
            parser.error(f"{shown(out / 'results.json')} is from a --quick run: the committed results come from a "
                         "full run")
        for report_dir in report_dirs(out, args.update_results):
            print(f"rebuilt {shown(write_report(results, report_dir))}")
        return
    if args.update_results and args.quick:
        parser.error("--update-results replaces the committed results of a full run: drop --quick")
    commit = source_commit()  # the code as it runs, before this run writes anything
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    started = time.perf_counter()
    phases = Phases()
    with phases("data"):
        splits = load_splits()
        # Normalization statistics from the base's own training pixels.
        pixels_01 = splits["public"].images / 255.0
        pixels = Pixels(mean=round(float(pixels_01.mean()), 3), std=round(float(pixels_01.std()), 3))
        data = out / "data"
        shutil.rmtree(data, ignore_errors=True)
        val = load_data(write_image_folder(splits["val"], data / "val"), TASK)
        test = load_data(write_jsonl(splits["test"], data / "test.jsonl"), TASK)
    print(f"digits: public {len(splits['public'].labels)}, private {len(splits['private'].labels)}, val {len(val)}, "
          f"test {len(test)}; N in {plan.ns}, seeds {plan.seeds}, fine-tunings {', '.join(plan.regimes)}", flush=True)

    rows, notes = [], []
    for seed in plan.seeds:
        run = SeedRun(seed, plan, splits, pixels, val, test, out, phases)
        run.run()
        rows += run.rows
        notes.append(run.notes)
    seconds = time.perf_counter() - started
    args_given = list(argv) if argv is not None else sys.argv[1:]
    meta = {"command": recorded_command(__file__, args_given), "commit": commit,
            "date": datetime.date.today().isoformat(), "seconds": seconds, "threads": args.threads,
            "quick": args.quick,
            "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
            "phases": {k: round(v, 1) for k, v in phases.seconds.items()},
            "sizes": {k: len(s.labels) for k, s in splits.items()}}
    results = {"meta": meta, "plan": asdict(plan), "rows": rows, "notes": notes}
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    targets = [shown(write_report(results, report_dir)) for report_dir in report_dirs(out, args.update_results)]
    print(f"done in {seconds:.0f} s: {', '.join(targets)}, {shown(out / 'results.json')}")


if __name__ == "__main__":
    main()
