"""The `>>>` examples in ame-hf's docstrings run (those marked `# doctest: +SKIP` need a Hub or a model)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import ame_hf

MODULES = sorted(m.name for m in pkgutil.iter_modules(ame_hf.__path__, "ame_hf.")
                 if not m.ispkg and m.name != "ame_hf.__main__")  # __main__ runs the CLI on import


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    failed, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert failed == 0, f"{failed} docstring example(s) of {name} failed (run `python -m doctest -v` on it)"


def test_there_are_examples_to_run():
    finder = doctest.DocTestFinder()
    examples = sum(len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name)))
    assert examples >= 10
