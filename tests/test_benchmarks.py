"""The benchmark scripts in benchmarks/: checks that need no models and no timing."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_no_script_shadows_a_standard_module():
    # `python benchmarks/x.py` puts benchmarks/ first on sys.path: a benchmarks/profile.py was imported by
    # cProfile (inside transformers) instead of the standard `profile`, and every benchmark crashed.
    shadowing = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.stem in sys.stdlib_module_names)
    assert not shadowing, f"rename {shadowing}: they hide the standard modules of the same name"
