"""Quiet means quiet: `--quiet` and `progress=False` show no progress bar and no transformers advice
(`demo`, `evaluate`, `tune`), and the Python API leaves transformers' and huggingface_hub's settings as it
found them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _noise(stderr: str) -> list[str]:
    """Lines of stderr other than ame-hf's own warnings: progress bars, transformers' advice, anything."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    return [line for line in lines if not line.startswith("WARNING: ")]


def _run_quiet(cwd: Path, *args: object) -> subprocess.CompletedProcess:
    """`ame-hf ARGS --quiet` in a fresh process (transformers' warn-once advice not yet given), from this tree."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "ame_hf", *map(str, args), "--quiet"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_evaluate_quiet_prints_nothing_on_stderr(lm_experts, tmp_path):
    experts, val, _ = lm_experts
    proc = _run_quiet(tmp_path, "evaluate", *experts[:2], "--data", val)
    assert not _noise(proc.stderr), proc.stderr  # was: `loss_type=None` ... unrecognized
    assert "loss" in proc.stdout


def test_tune_quiet_prints_nothing_on_stderr(lm_experts, tmp_path):
    experts, val, _ = lm_experts
    proc = _run_quiet(tmp_path, "tune", *experts, "--data", val, "--out", tmp_path / "best", "--budget", "1")
    assert not _noise(proc.stderr), proc.stderr
    assert "selected:" in proc.stdout


def test_demo_quiet_prints_nothing_on_stderr(tmp_path):
    proc = _run_quiet(tmp_path, "demo", "--steps", "2", "--out", "demo")
    assert not _noise(proc.stderr), proc.stderr  # was: the attention_mask advice, `loss_type=None`
    assert "held-out next-token loss" in proc.stdout


def _library_settings() -> tuple:
    from huggingface_hub.utils import are_progress_bars_disabled
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    return (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), hub_logging.get_verbosity(),
            are_progress_bars_disabled(), are_progress_bars_disabled("some.group"))


@pytest.fixture
def loud_libraries():
    """transformers and huggingface_hub at INFO with their bars on, except one hub group: settings a user may
    have, which a quiet call must restore exactly (then the defaults again)."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    before = _library_settings()
    hf_logging.set_verbosity_info()
    hub_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    disable_progress_bars("some.group")
    yield _library_settings()
    hf_logging.set_verbosity(before[0])
    hub_logging.set_verbosity(before[2])
    hf_logging.enable_progress_bar() if before[1] else hf_logging.disable_progress_bar()
    enable_progress_bars() if not before[3] else disable_progress_bars()


def test_python_api_evaluate_without_progress_is_quiet_and_restores_settings(lm_experts, classifiers, capfd,
                                                                            loud_libraries):
    import ame_hf

    experts, val, _ = lm_experts
    capfd.readouterr()
    lm = ame_hf.evaluate(experts[:1], data=val, progress=False)
    classifier = ame_hf.evaluate(classifiers[0][:1], data=classifiers[1], progress=False)  # a pipeline
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err, err
    assert lm.scores[0][1] > 0 and 0 <= classifier.scores[0][1] <= 1
    assert _library_settings() == loud_libraries


def test_python_api_evaluate_with_progress_keeps_transformers_bars(lm_experts, capfd, loud_libraries):
    """progress=True changes nothing of the libraries' settings: their bars show as the user set them."""
    from ame_hf.evaluation import evaluate_model, load_data

    experts, val, _ = lm_experts
    capfd.readouterr()
    evaluate_model(str(experts[0]), load_data(val, "text-generation"), "text-generation", progress=True)
    assert "Loading weights" in capfd.readouterr().err
    assert _library_settings() == loud_libraries


def test_quiet_libraries_nests_and_restores_after_an_error(loud_libraries):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from ame_hf._quiet import quiet_libraries

    with pytest.raises(RuntimeError):
        with quiet_libraries():
            with quiet_libraries():
                pass
            # the inner block's end restores nothing while the outer one is open
            assert hf_logging.get_verbosity() == logging.ERROR
            assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
            raise RuntimeError("a failed load")
    assert _library_settings() == loud_libraries
    with quiet_libraries(False):
        assert _library_settings() == loud_libraries


def test_demo_passes_an_attention_mask(monkeypatch):
    """<base> is the demo's pad token and the first token of every base sequence: transformers advises an
    attention mask unless one is given (once per process, so checked at its source)."""
    from transformers import GPT2LMHeadModel
    from transformers.modeling_utils import PreTrainedModel

    from ame_hf.demo import task_losses, tiny_config, train

    masks = []
    monkeypatch.setattr(PreTrainedModel, "warn_if_padding_and_no_attention_mask",
                        lambda self, input_ids, attention_mask: masks.append(attention_mask))
    model = GPT2LMHeadModel(tiny_config())
    train(model, "base", steps=1, seed=0)
    task_losses(model)
    assert masks and all(mask is not None for mask in masks)
