"""ame-hf merge benchmark: wall time and peak RSS of ame-hf against a plain script and mergekit.

    python benchmarks/run.py            # full: 134M model N=2,4,8 (fp32), N=4 (bf16), 551M model N=4
    python benchmarks/run.py --quick    # 134M model only, N=2 and 4, fp32
    python benchmarks/run.py --smoke    # a tiny model, one run each: checks the harness itself
    python benchmarks/run.py --gpu      # on a CUDA machine: 134M N=4, ame-hf on the CPU and on the GPU
    python benchmarks/run.py --set 3b-bf16-n3 --no-mergekit --runs 1   # 3 x 3.2B bf16 (19 GB), never in a full run

Inputs are built once into the work directory (default benchmarks/_work, git-ignored) and reused.
Every job runs as its own process under `measure.py` (whole-process wall time, peak RSS), once as
a warm-up (discarded, so that all jobs read from a warm page cache), then `--runs` times, the jobs
of one input set taking turns, then once more with its input files dropped from the page cache: what
it reads from storage (a second read of a byte the page cache still holds costs no I/O). The table goes
to stdout and <work>/results.md (+ raw results.json); the committed benchmarks/RESULTS.md (RESULTS-gpu.md
for --gpu) is rewritten only with --update-results.

This script imports neither torch nor ame_hf: it only starts processes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from build_inputs import copy_dir, param_count  # noqa: E402  (no torch at import time)

sys.path.insert(0, str(REPO / "examples"))
from _results import recorded_command  # noqa: E402  (shared with the examples: the command a report records)

MEASURE = HERE / "measure.py"
PLAIN = HERE / "plain_average.py"
COMPARE = HERE / "compare.py"

JOB_LABELS = {
    "plain": "plain script (floor)",
    "soup": "ame-hf soup (sgd)",
    "adam": "ame-hf AME-Adam (lr 1e-4)",
    "default": "ame-hf default merge (adam, relative lr 0.005)",
    "mergekit": "mergekit linear",
    "soup_gpu": "ame-hf soup (sgd), cuda",
    "adam_gpu": "ame-hf AME-Adam (lr 1e-4), cuda",
    "cat": "cat inputs > /dev/null",
}
ALL_JOBS = ("plain", "soup", "adam", "default", "mergekit")
GPU_JOBS = ("plain", "soup", "soup_gpu", "adam", "adam_gpu")
SCALING_JOBS = ("plain", "soup", "adam", "default")
LARGE_JOBS = ("plain", "soup", "default")
# Sets only a --set names (their disk and time would double a full run).
EXTRA_SETS = (("3b", "bf16", 3, ("cat", "plain", "soup", "default")),)
# Options that only say where output goes, left out of a report's command. Value: whether one follows.
OUTPUT_OPTIONS = {"--out": True, "--results": True, "--update-results": False}
# The release RESULTS.md was measured against: an unpinned install would compare against whatever is newest.
MERGEKIT_SPEC = "mergekit==0.1.5"

# Targets of the "Read every input byte once" issue, checked on the 4 x 134M fp32 input set.
TARGET_SET = ("small", "fp32", 4)
RSS_TARGET_MIB = 450
SOUP_VS_PLAIN = 1.1
SOUP_VS_MERGEKIT = 0.5
ADAM_VS_PLAIN = 1.3
DEFAULT_VS_PLAIN = 1.3
# ... and on the 1B-class bf16 set, where start-up does not dominate.
LARGE_TARGET_SET = ("1b", "bf16", 3)
LARGE_DEFAULT_VS_PLAIN = 1.2
# Targets of "The biggest models ..." (issue 25): the default merge at full speed.
BIG_DEFAULT_VS_PLAIN = 1.2  # 4 x 134M fp32
BIG_READ_VS_INPUT = 1.05  # 4 x 134M fp32: every input byte read once
BIG_DEFAULT_VS_SOUP = 1.5  # 3 x 1.1B bf16
# Jobs that map their input files (safe_open): `measure.py` counts only read()/pread(), so their reads are not seen.
MAPS_FILES = {"plain", "mergekit"}
FP32_TOLERANCE = 1e-6

CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class InputSet:
    model: str  # a key of build_inputs.MODELS
    dtype: str  # fp32 | bf16
    n: int
    jobs: tuple[str, ...]

    @property
    def one_output(self) -> bool:
        """Whether each output is deleted after its run (no output checks): N + 2 copies would not fit the disk."""
        return self.model == "3b"

    @property
    def key(self) -> str:
        return f"{self.model}-{self.dtype}-n{self.n}"

    @property
    def size(self) -> str:
        count = param_count(self.model) / 1e6
        return f"{count:.0f}M" if count >= 10 else f"{count:.2f}M"

    def inputs(self, models: Path) -> list[Path]:
        return [copy_dir(models, self.model, self.dtype, i) for i in range(self.n)]

    def input_bytes(self, models: Path) -> int:
        """Bytes of weight files a merge of this set reads (every input byte once)."""
        return sum(f.stat().st_size for d in self.inputs(models) for f in d.glob("*.safetensors"))


@dataclass
class JobResult:
    job: str
    runs: list[dict] = field(default_factory=list)
    error: str | None = None
    cold: dict | None = None  # the run with its inputs dropped from the page cache (None: not run)

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.runs]
        return statistics.median(values) if values else None


def input_sets(args: argparse.Namespace) -> list[InputSet]:
    if args.gpu:
        return [InputSet("tiny" if args.smoke else "small", "fp32", 4, GPU_JOBS)]
    if args.smoke:
        return [InputSet("tiny", "fp32", 2, SCALING_JOBS), InputSet("tiny", "fp32", 4, ALL_JOBS),
                InputSet("tiny", "bf16", 4, ALL_JOBS)]
    sets = [InputSet("small", "fp32", 2, SCALING_JOBS), InputSet("small", "fp32", 4, ALL_JOBS)]
    if not args.quick:
        sets += [InputSet("small", "bf16", 4, ALL_JOBS), InputSet("small", "fp32", 8, SCALING_JOBS),
                 InputSet("large", "fp32", 4, LARGE_JOBS), InputSet(*LARGE_TARGET_SET, LARGE_JOBS)]
    if args.set:
        sets += [InputSet(*extra) for extra in EXTRA_SETS]
        unknown = sorted(set(args.set) - {s.key for s in sets})
        if unknown:
            raise SystemExit(f"unknown --set {', '.join(unknown)}; choose from {', '.join(s.key for s in sets)}")
        sets = [s for s in sets if s.key in args.set]
    return sets


# -- setup ----------------------------------------------------------------------------------------

def build_inputs(sets: list[InputSet], models: Path) -> None:
    for model in dict.fromkeys(s.model for s in sets):
        copies = max((s.n for s in sets if s.model == model and s.dtype == "fp32"), default=0)
        bf16 = max((s.n for s in sets if s.model == model and s.dtype == "bf16"), default=0)
        subprocess.run([sys.executable, str(HERE / "build_inputs.py"), "--model", model, "--copies", str(copies),
                        "--bf16-copies", str(bf16), "--out", str(models)],
                       check=True, env={**os.environ, **CHILD_ENV, "TQDM_DISABLE": "1"})


def setup_mergekit(work: Path, spec: str) -> tuple[Path | None, str]:
    """(mergekit-yaml path or None, a note). A virtual env of its own under the work dir, built once."""
    venv = work / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    marker = venv / ".benchmark-ready"  # holds the spec it was built for: a new pin rebuilds it
    log = work / "logs" / "mergekit-install.log"
    if not marker.is_file() or marker.read_text().strip() != spec:
        print(f"[setup] installing {spec} into {venv} (once; about a minute; log: {log})", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            try:
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out)
                # torch pinned to the release whose CPU wheel is on our machines (else pip fetches CUDA).
                subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "torch==2.13.0", spec],
                               check=True, stdout=out, stderr=out, timeout=1800)
                subprocess.run([str(exe), "--help"], check=True, stdout=out, stderr=out, timeout=300)
            except (subprocess.SubprocessError, OSError) as err:
                return None, f"mergekit skipped: installing {spec!r} failed ({err}); see {log}"
        marker.write_text(spec + "\n")
    versions = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m, json; "
         "print(json.dumps({p: m.version(p) for p in ('mergekit', 'torch', 'transformers', 'safetensors')}))"],
        capture_output=True, text=True)
    if versions.returncode != 0:
        return None, f"mergekit skipped: its virtual env at {venv} is broken (delete it to reinstall)"
    v = json.loads(versions.stdout)
    return exe, f"mergekit {v['mergekit']} (own venv: torch {v['torch']}, transformers {v['transformers']})"


def mergekit_config(inputs: list[Path], dtype: str, path: Path) -> Path:
    lines = ["merge_method: linear", "models:"]
    for p in inputs:
        lines += [f"  - model: {json.dumps(str(p))}", "    parameters: {weight: 1.0}"]
    # Compute in float32 (as ame-hf and the plain script do) and write the inputs' dtype.
    lines += ["parameters: {normalize: true}", "dtype: float32",
              f"out_dtype: {'bfloat16' if dtype == 'bf16' else 'float32'}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def job_command(job: str, s: InputSet, inputs: list[Path], out: Path, work: Path,
                mergekit: Path | None) -> list[str] | None:
    ame = Path(sys.executable).parent / "ame-hf"
    ame_cmd = [str(ame)] if ame.is_file() else [sys.executable, "-m", "ame_hf.cli"]
    ins = [str(p) for p in inputs]
    if job == "plain":
        return [sys.executable, str(PLAIN), *ins, "--out", str(out)]
    if job == "cat":  # the time to read the same bytes and nothing else
        files = [str(f) for p in inputs for f in sorted(p.glob("*.safetensors"))]
        return ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files]
    # The device is always named: on a GPU machine the default would be the GPU.
    device = ["--device", "cuda" if job.endswith("_gpu") else "cpu"]
    if job in ("soup", "soup_gpu"):
        return [*ame_cmd, "merge", *ins, "--out", str(out), "--optimizer", "sgd", "--quiet", "--overwrite", *device]
    if job in ("adam", "adam_gpu"):
        return [*ame_cmd, "merge", *ins, "--out", str(out), "--optimizer", "adam", "--lr", "1e-4", "--quiet",
                "--overwrite", *device]
    if job == "default":  # what most users run: no optimizer options at all
        return [*ame_cmd, "merge", *ins, "--out", str(out), "--quiet", "--overwrite", *device]
    if job == "mergekit":
        if mergekit is None:
            return None
        config = mergekit_config(inputs, s.dtype, work / "configs" / f"mergekit-{s.key}.yml")
        return [str(mergekit), str(config), str(out), "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"]
    raise ValueError(job)


# -- measuring ------------------------------------------------------------------------------------

class JobFailed(Exception):
    pass


def input_files(inputs: list[Path]) -> list[Path]:
    """Every file of the input folders (weights, config, tokenizer), in a fixed order."""
    return [file for d in inputs for file in sorted(d.iterdir()) if file.is_file()]


def prewarm(inputs: list[Path]) -> None:
    """Read every input file, so the job finds it in the page cache. Needed on machines that page
    out cold page cache on their own (e.g. DAMON proactive reclaim on VMs), not only at start."""
    buf = bytearray(8 << 20)
    for file in input_files(inputs):
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def evict(inputs: list[Path]) -> None:
    """Drop every input file from the page cache (`posix_fadvise` DONTNEED: clean pages no process maps), so
    that the job reads them from storage (`measure_set` asks for it only where `os.posix_fadvise` exists)."""
    for file in input_files(inputs):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_once(cmd: list[str], inputs: list[Path], out: Path, log: Path, result_file: Path,
             cold: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # the previous job's writes must not be flushed on this job's time
    if cold:
        evict(inputs)
    else:
        prewarm(inputs)
    load = os.getloadavg()[0]
    with open(log, "ab") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n".encode())
        f.flush()
        rc = subprocess.run([sys.executable, str(MEASURE), "--result", str(result_file), "--", *cmd],
                            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **CHILD_ENV}).returncode
    if rc != 0 or not result_file.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise JobFailed(f"exit status {rc}; last lines of {log}:\n{tail}")
    r = json.loads(result_file.read_text())
    result_file.unlink()
    return {"wall_s": r["wall_s"], "cpu_s": r["user_s"] + r["sys_s"], "rss_mib": r["max_rss_kib"] / 1024,
            "disk_read_mib": r["disk_read_kib"] / 1024, "wrapper_rss_mib": r["wrapper_rss_kib"] / 1024,
            "read_bytes": None if r.get("read_kib") is None else r["read_kib"] * 1024,
            "load_before": load}


def measure_set(s: InputSet, runs: int, work: Path, mergekit: Path | None, mergekit_note: str) -> dict[str, JobResult]:
    inputs = s.inputs(work / "models")
    results: dict[str, JobResult] = {}
    commands: dict[str, list[str]] = {}
    for job in s.jobs:
        results[job] = JobResult(job)
        cmd = job_command(job, s, inputs, work / "outputs" / f"{s.key}-{job}", work, mergekit)
        if cmd is None:
            results[job].error = mergekit_note
            continue
        commands[job] = cmd
    log_dir = work / "logs"
    result_file = work / "tmp" / "measure.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    # Round 0 is the warm-up, then the timed runs; last, where files can be dropped from the page cache, one run
    # with the inputs not cached (after the timed runs, which all found them cached).
    last = runs + 1 if hasattr(os, "posix_fadvise") else runs
    for round_ in range(last + 1):
        cold = round_ > runs
        for job, cmd in commands.items():
            if results[job].error:
                continue
            out = work / "outputs" / f"{s.key}-{job}"
            try:
                r = run_once(cmd, inputs, out, log_dir / f"{s.key}-{job}.log", result_file, cold=cold)
            except JobFailed as err:
                print(f"  {JOB_LABELS[job]}: {'the run with its inputs not cached ' if cold else ''}FAILED, {err}",
                      flush=True)
                if not cold:  # the timed figures stand without it
                    results[job].error = f"failed: {err}"
                continue
            what = "warm-up" if round_ == 0 else "not cached" if cold else f"run {round_}/{runs}"
            print(f"  {s.key:>16} {JOB_LABELS[job]:<26} {what:<10} wall {r['wall_s']:7.2f} s  "
                  f"cpu {r['cpu_s']:7.2f} s  peak RSS {r['rss_mib']:7.0f} MiB  disk read {r['disk_read_mib']:5.0f} MiB  "
                  + (f"read {r['read_bytes'] / 2**20:6.0f} MiB  " if job not in MAPS_FILES and r["read_bytes"] else "")
                  + f"(load {r['load_before']:.1f})",
                  flush=True)
            if cold:
                results[job].cold = r
            elif round_ > 0:
                results[job].runs.append(r)
            if s.one_output:
                shutil.rmtree(out, ignore_errors=True)
    return results


def compare_outputs(s: InputSet, results: dict[str, JobResult], work: Path) -> list[dict]:
    """Diffs between the last outputs of the jobs (soup must equal plain and mergekit)."""
    pairs = [("soup", "plain", True), ("soup", "mergekit", True), ("mergekit", "plain", True),
             ("adam", "soup", False), ("soup_gpu", "plain", True), ("adam_gpu", "adam", False)]
    checks = []
    for a, b, required in pairs:
        if a not in results or b not in results or results[a].error or results[b].error:
            continue
        out_a, out_b = (work / "outputs" / f"{s.key}-{j}" for j in (a, b))
        proc = subprocess.run([sys.executable, str(COMPARE), str(out_a), str(out_b)], capture_output=True, text=True)
        if proc.returncode != 0:
            checks.append({"set": s.key, "a": a, "b": b, "required": required, "ok": False,
                           "error": proc.stderr.strip().splitlines()[-1:] or ["compare failed"]})
            continue
        d = json.loads(proc.stdout)
        if s.dtype == "fp32":
            ok = not d["problems"] and d["max_abs_diff"] <= FP32_TOLERANCE
            rule = f"max abs diff <= {FP32_TOLERANCE:g}"
        else:
            ok = not d["problems"] and d["beyond_rounding"] == 0
            rule = "every element within one bf16 rounding step"
        checks.append({"set": s.key, "dtype": s.dtype, "a": a, "b": b, "required": required, "ok": ok,
                       "rule": rule, **d})
        verdict = ("OK" if ok else "MISMATCH") if required else "(information)"
        print(f"  check {JOB_LABELS[a]} vs {JOB_LABELS[b]}: max abs diff {d['max_abs_diff']:.3g} "
              f"({d['differing']} of {d['numel']} elements differ, {d['beyond_rounding']} beyond rounding) "
              f"{verdict}", flush=True)
    return checks


# -- reporting ------------------------------------------------------------------------------------

def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def results_table(sets: list[InputSet], all_results: dict[str, dict[str, JobResult]],
                  input_bytes: dict[str, int]) -> list[str]:
    lines = ["| job | dtype | N | model | median wall s | median CPU s | median peak RSS MiB | wall ÷ plain | "
             "wall ÷ mergekit | RSS ÷ plain | RSS ÷ mergekit | median disk read MiB | input GB/s (wall) | read ÷ input | "
             "wall s, inputs not cached | storage read ÷ input |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sets:
        res = all_results.get(s.key, {})
        plain, mk = res.get("plain"), res.get("mergekit")
        for job in s.jobs:
            r = res.get(job)
            if r is None:
                continue
            if not r.runs:
                lines.append(f"| {JOB_LABELS[job]} | {s.dtype} | {s.n} | {s.size} | {(r.error or 'n/a').splitlines()[0]} "
                             "| | | | | | | | | | | |")
                continue
            wall, cpu, rss = r.median("wall_s"), r.median("cpu_s"), r.median("rss_mib")
            cells = [JOB_LABELS[job], s.dtype, str(s.n), s.size, _fmt(wall, ".2f"), _fmt(cpu, ".2f"), _fmt(rss, ".0f"),
                     _ratio(wall, plain.median("wall_s") if plain else None),
                     _ratio(wall, mk.median("wall_s") if mk else None),
                     _ratio(rss, plain.median("rss_mib") if plain else None),
                     _ratio(rss, mk.median("rss_mib") if mk else None), _fmt(r.median("disk_read_mib"), ".0f"),
                     _fmt(input_bytes.get(s.key, 0) / 1e9 / wall if wall else None, ".2f"),
                     "mmap" if job in MAPS_FILES else _fmt(read_ratio(r, input_bytes.get(s.key)), ".3f"),
                     _fmt(r.cold["wall_s"] if r.cold else None, ".2f"),
                     _fmt(storage_ratio(r, input_bytes.get(s.key)), ".3f")]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def read_ratio(r: JobResult | None, input_bytes: int | None) -> float | None:
    """Median bytes the job read (`measure.py`'s `read_kib`: imports included: about 30 MB for a merge) ÷ the
    input weight files' bytes; None where not counted (no /proc)."""
    values = [x.get("read_bytes") for x in r.runs] if r is not None else []
    if not values or None in values or not input_bytes:
        return None
    return statistics.median(values) / input_bytes


def storage_ratio(r: JobResult | None, input_bytes: int | None) -> float | None:
    """What the job read from storage with its inputs not cached (`ru_inblock`) ÷ the input weight files' bytes:
    mapped files included, and a second read of a byte the page cache still holds not; None where not run."""
    if r is None or r.cold is None or not input_bytes:
        return None
    return r.cold["disk_read_mib"] * 2**20 / input_bytes


def target_lines(all_results: dict[str, dict[str, JobResult]], input_bytes: dict[str, int]) -> list[str]:
    def med(key: tuple, job: str, what: str) -> float | None:
        r = all_results.get(InputSet(*key, ()).key, {}).get(job)
        return r.median(what) if r and r.runs else None

    lines: list[str] = []

    def target(text: str, value: float | None, limit: float, unit: str, cpu: float | None = None,
               spec: str = ".2f", indent: str = "") -> None:
        if value is None:
            lines.append(f"{indent}- {text}: not measured")
            return
        verdict = "**met**" if value <= limit else "**missed**"
        shown = f"{value:{spec}}"
        if value > limit >= float(shown):  # rounded onto the limit: one more digit shows why it is missed
            shown = f"{value:.{int(spec[1:-1]) + 1}f}"
        extra = f"; on CPU time (user + sys): {cpu:.2f}{unit}" if cpu is not None else ""
        lines.append(f"{indent}- {text}: {shown}{unit} (target <= {limit:g}{unit}) {verdict}{extra}")

    def ratio(a: str, b: str, what: str, key: tuple = TARGET_SET) -> float | None:
        x, y = med(key, a, what), med(key, b, what)
        return x / y if x and y else None

    for job in ("soup", "adam", "default"):
        target(f"{JOB_LABELS[job]} peak RSS, 4 x 134M fp32", med(TARGET_SET, job, "rss_mib"), RSS_TARGET_MIB, " MiB",
               spec=".0f")
    target("soup wall ÷ plain script", ratio("soup", "plain", "wall_s"), SOUP_VS_PLAIN, "x",
           ratio("soup", "plain", "cpu_s"))
    target("soup wall ÷ mergekit linear", ratio("soup", "mergekit", "wall_s"), SOUP_VS_MERGEKIT, "x",
           ratio("soup", "mergekit", "cpu_s"))
    target("AME-Adam wall ÷ plain script", ratio("adam", "plain", "wall_s"), ADAM_VS_PLAIN, "x",
           ratio("adam", "plain", "cpu_s"))
    target("default merge wall ÷ plain script", ratio("default", "plain", "wall_s"), DEFAULT_VS_PLAIN, "x",
           ratio("default", "plain", "cpu_s"))
    target("1B-class bf16 (3 x 1.1B) default merge wall ÷ plain script",
           ratio("default", "plain", "wall_s", LARGE_TARGET_SET), LARGE_DEFAULT_VS_PLAIN, "x",
           ratio("default", "plain", "cpu_s", LARGE_TARGET_SET))
    lines.append("- issue 25 (\"The biggest models ...\"):")
    target("default merge wall ÷ plain script, 4 x 134M fp32", ratio("default", "plain", "wall_s"),
           BIG_DEFAULT_VS_PLAIN, "x", ratio("default", "plain", "cpu_s"), indent="  ")
    small = all_results.get(InputSet(*TARGET_SET, ()).key, {})
    target("default merge bytes read ÷ input bytes, 4 x 134M fp32",
           read_ratio(small.get("default"), input_bytes.get(InputSet(*TARGET_SET, ()).key)),
           BIG_READ_VS_INPUT, "x", spec=".3f", indent="  ")
    target("default merge bytes read from storage ÷ input bytes (inputs not cached), 4 x 134M fp32",
           storage_ratio(small.get("default"), input_bytes.get(InputSet(*TARGET_SET, ()).key)),
           BIG_READ_VS_INPUT, "x", spec=".3f", indent="  ")
    target("3 x 1.1B bf16 default merge wall ÷ soup", ratio("default", "soup", "wall_s", LARGE_TARGET_SET),
           BIG_DEFAULT_VS_SOUP, "x", ratio("default", "soup", "cpu_s", LARGE_TARGET_SET), indent="  ")
    return lines


def source_fingerprint() -> dict[str, str]:
    """A hash of each ame_hf source file, to notice edits during a run (a shared work tree)."""
    import hashlib

    return {str(f.relative_to(REPO)): hashlib.sha256(f.read_bytes()).hexdigest()[:12]
            for f in sorted((REPO / "ame_hf").rglob("*.py"))}


def environment(mergekit_note: str) -> dict[str, str]:
    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "ame_hf"):
        commit += " + uncommitted changes in ame_hf/"
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0) if Path("/proc/meminfo").is_file() else 0
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    gpus = ""
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        gpus = "; GPU: " + ", ".join(smi.stdout.strip().splitlines()) if smi.returncode == 0 else ""
    return {
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {mem / 1024 ** 2:.1f} GiB RAM, {platform.system()} "
                   f"{platform.release()}{gpus}",
        "software": f"Python {platform.python_version()}, ame-hf {version('ame-hf')} (git {commit}), "
                    f"torch {version('torch')}, safetensors {version('safetensors')}, "
                    f"transformers {version('transformers')}; {mergekit_note}",
    }


def write_report(path_list: list[Path], command: str, env: dict[str, str], sets: list[InputSet], runs: int,
                 table: list[str], targets: list[str], checks: list[dict], started: float,
                 loads: tuple[float, float], wrapper_rss: float) -> None:
    check_lines = []
    for c in checks:
        verdict = ("OK" if c["ok"] else "MISMATCH") if c["required"] else "information"
        if "max_abs_diff" in c:
            check_lines.append(f"- {c['set']}: {JOB_LABELS[c['a']]} vs {JOB_LABELS[c['b']]}: max abs diff "
                               f"{c['max_abs_diff']:.3g}, {c['differing']} of {c['numel']} elements differ, "
                               f"{c['beyond_rounding']} beyond one rounding step ({c['rule']}): {verdict}")
        else:
            check_lines.append(f"- {c['set']}: {JOB_LABELS[c['a']]} vs {JOB_LABELS[c['b']]}: {c['error']}")
    text = "\n".join([
        "# ame-hf merge benchmark",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"({(time.perf_counter() - started) / 60:.0f} min)",
        f"- command: `{command}`",
        f"- machine: {env['machine']}; load average {loads[0]:.1f} at start, {loads[1]:.1f} at end",
        f"- software: {env['software']}",
        f"- method: each job is a separate process, run once as a warm-up (discarded; inputs then come from "
        f"the page cache, and every input file is read again just before each run, outside the timing), then {runs} times, the jobs of one input set taking turns; medians shown. Wall = whole "
        f"process; CPU = user + sys; peak RSS = the process's ru_maxrss from os.wait4 in a small wrapper "
        f"(benchmarks/measure.py; its own {wrapper_rss:.0f} MiB is the floor); disk read = ru_inblock (0 = warm "
        f"page cache); read ÷ input = what the process read through read()/pread() (rchar of /proc/<pid>/io, "
        f"imports included, page-cache hits too) ÷ the input weight files' bytes, where the job reads that way "
        f"(\"mmap\": the job maps its files with safe_open, and those reads are not counted). Last, each job runs "
        f"once more with its input files dropped from the page cache (posix_fadvise DONTNEED): its wall time then, "
        f"and storage read ÷ input = what it read from storage (ru_inblock, mapped files included) ÷ the input "
        f"weight files' bytes. Inputs: a Llama "
        f"(LlamaConfig) with a shared init and copies init + 0.01 * randn(seed i), saved by save_pretrained.",
        "",
        *table,
        "",
        "## Targets (issues \"Read every input byte once, and start fast\" and 25; 4 x 134M fp32 unless said)",
        "",
        *targets,
        "",
        "## Output checks (last run of each job)",
        "",
        *(check_lines or ["- none (no two comparable outputs)"]),
        "",
    ])
    for path in path_list:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}", flush=True)


# -- main -----------------------------------------------------------------------------------------

def report_paths(args: argparse.Namespace, work: Path) -> list[Path]:
    """Where the report goes: the work directory, --results, and with --update-results the committed report."""
    paths = [work / "results.md", *([args.results] if args.results is not None else [])]
    if args.update_results:
        paths.append(HERE / ("RESULTS-gpu.md" if args.gpu else "RESULTS.md"))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark ame-hf merges against a plain script and mergekit.")
    p.add_argument("--quick", action="store_true", help="only the 134M model, N=2 and N=4, fp32")
    p.add_argument("--smoke", action="store_true", help="a tiny model and one run: test the harness")
    p.add_argument("--gpu", action="store_true",
                   help="134M model, N=4, fp32: ame-hf with --device cpu and --device cuda (needs a CUDA GPU)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per job after the warm-up (default 5)")
    p.add_argument("--out", type=Path, default=HERE / "_work", help="work directory (default benchmarks/_work)")
    p.add_argument("--no-mergekit", action="store_true", help="skip the mergekit baseline")
    p.add_argument("--mergekit-spec", default=MERGEKIT_SPEC,
                   help=f"pip requirement for mergekit (default: {MERGEKIT_SPEC})")
    p.add_argument("--results", type=Path, default=None, help="also write the report here")
    p.add_argument("--update-results", action="store_true",
                   help="also rewrite the committed benchmarks/RESULTS.md (RESULTS-gpu.md with --gpu); only for "
                        "a full run (no --quick, --smoke or --set)")
    p.add_argument("--set", action="append", default=None, metavar="KEY",
                   help="only this input set of the full run (repeatable), e.g. --set 1b-bf16-n3")
    p.add_argument("--keep-outputs", action="store_true", help="keep the merged models in <work>/outputs")
    args = p.parse_args(argv)
    runs = args.runs if args.runs is not None else (1 if args.smoke else 5)
    if runs < 1:
        p.error("--runs must be at least 1")
    if args.update_results and (args.quick or args.smoke or args.set):
        p.error("--update-results replaces the committed results of a full run: drop --quick, --smoke and --set")
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    command = recorded_command(__file__, sys.argv[1:] if argv is None else argv, OUTPUT_OPTIONS)
    work = args.out.resolve()
    for sub in ("models", "outputs", "logs", "configs"):
        (work / sub).mkdir(parents=True, exist_ok=True)

    sets = input_sets(args)
    fingerprint = source_fingerprint()
    print(f"[setup] work directory {work}; input sets: {', '.join(s.key for s in sets)}; {runs} run(s) each",
          flush=True)
    build_inputs(sets, work / "models")
    mergekit, mergekit_note = (None, "mergekit skipped (--no-mergekit)") if args.no_mergekit \
        else setup_mergekit(work, args.mergekit_spec)
    print(f"[setup] {mergekit_note}", flush=True)
    env = environment(mergekit_note)  # versions as measured, not as found at the end

    all_results: dict[str, dict[str, JobResult]] = {}
    checks: list[dict] = []
    wrapper_rss = 0.0
    for s in sets:
        print(f"[bench] {s.key}: {', '.join(JOB_LABELS[j] for j in s.jobs)}", flush=True)
        all_results[s.key] = measure_set(s, runs, work, mergekit, mergekit_note)
        if not s.one_output:
            checks += compare_outputs(s, all_results[s.key], work)
        wrapper_rss = max([wrapper_rss] + [r["wrapper_rss_mib"] for jr in all_results[s.key].values() for r in jr.runs])
        if not args.keep_outputs:
            for job in s.jobs:
                shutil.rmtree(work / "outputs" / f"{s.key}-{job}", ignore_errors=True)

    input_bytes = {s.key: s.input_bytes(work / "models") for s in sets}
    table = results_table(sets, all_results, input_bytes)
    targets = target_lines(all_results, input_bytes)
    now = source_fingerprint()
    changed = sorted(f for f in set(now) | set(fingerprint) if now.get(f) != fingerprint.get(f))
    if changed:
        env["software"] += f" **WARNING: changed during this run: {', '.join(changed)}**"
        print(f"WARNING: {', '.join(changed)} changed during this run; rerun for consistent results", flush=True)
    print("\n" + "\n".join(table) + "\n\n" + "\n".join(targets), flush=True)
    (work / "results.json").write_text(json.dumps({
        "command": command, **env, "runs": runs,
        "results": {k: {j: {"runs": r.runs, "error": r.error} for j, r in v.items()} for k, v in all_results.items()},
        "checks": checks,
    }, indent=1) + "\n")
    write_report(report_paths(args, work), command, env, sets, runs, table, targets, checks, started,
                 (load_start, os.getloadavg()[0]), wrapper_rss)
    failed = [c for c in checks if c["required"] and not c["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
