"""A merge of a model transformers converts nothing of (a Llama) imports neither transformers' conversion mapping
nor its model configs: they pull in sympy and torch.distributed, 73 + 62 MiB of a merge's peak memory and about
2 s of its start. The shortcuts that avoid them give transformers' own answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from factories import make_big_checkpoints

_MERGE = """
import sys
import ame_hf
*paths, out = sys.argv[1:]
ame_hf.merge(paths, out, progress=False, device="cpu")
print(sorted(m for m in ("sympy", "transformers", "transformers.conversion_mapping") if m in sys.modules))
"""


def test_a_llama_merge_imports_no_transformers(tmp_path):
    paths = make_big_checkpoints(tmp_path / "in", 2, rows=64)
    proc = subprocess.run([sys.executable, "-c", _MERGE, *map(str, paths), str(tmp_path / "out")],
                          capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_conversion_shortcut_agrees_with_transformers():
    """Every model type transformers knows: `_may_convert` is False only where transformers holds no conversion
    (in a fresh process: the shortcut is taken only while transformers' mapping is not imported)."""
    code = """
import json
from ame_hf._saved_layout import _may_convert
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
shortcut = {t: _may_convert(t) for t in CONFIG_MAPPING_NAMES}
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
print(json.dumps([len(shortcut), sum(shortcut.values()),
                  [t for t, may in shortcut.items() if not may and get_checkpoint_conversion_mapping(t) is not None]]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    count, may, missed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert count > 100 and 0 < may < count  # the shortcut does decide (llama: no; mixtral: yes)
    assert missed == []


def test_the_vocabulary_shortcut_agrees_with_transformers():
    """A config whose only dicts are never sub-configs (a Llama's `rope_parameters`): its vocabulary size is the
    top-level one, as transformers' text config says; a vision-language config still asks transformers."""
    from ame_hf import _text_config

    llama = {"model_type": "llama", "vocab_size": 320, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    assert _text_config.vocab_size(llama) == 320
    assert _text_config._text_key(json.dumps(llama, sort_keys=True)) is None  # transformers: the config itself
    llava = {"model_type": "llava", "vocab_size": 5, "text_config": {"model_type": "llama", "vocab_size": 320}}
    assert _text_config.vocab_size(llava) == 320
