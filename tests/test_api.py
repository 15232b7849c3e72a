"""The public Python API (ame_hf/__init__.py, ame_hf/api.py): names pinned, merge/from_pretrained/push
(AmeConfig itself: tests/test_config.py)."""

from __future__ import annotations

from huggingface_hub import HfApi

import ame_hf
from ame_hf import AmeConfig
from factories import make_finetunes

# The public API as it stood before the redesign: it may only grow (names added on purpose, below).
PUBLIC_BEFORE_REDESIGN = [
    "AmeConfig", "AmeError", "Checkpoint", "CheckpointError", "CompatibilityReport", "HubError",
    "IncompatibleCheckpointsError", "Ingredient", "IngredientNotFoundError", "InvalidConfigError", "MergeResult",
    "OutputError", "PushError", "UnknownOptimizerError", "__version__", "check", "from_pretrained", "merge",
    "push_to_hub",
]
ADDED = ["Evaluation", "GreedySoupResult", "InsufficientSpaceError", "PushInfo", "TuneResult",
         "UnsupportedOptimizerError", "evaluate", "greedy_soup", "tune"]


def test_public_names_are_pinned_and_only_grow():
    assert set(PUBLIC_BEFORE_REDESIGN) <= set(ame_hf.__all__)
    assert ame_hf.__all__ == sorted(PUBLIC_BEFORE_REDESIGN + ADDED)
    for name in ame_hf.__all__:
        assert getattr(ame_hf, name) is not None
    # Functions, not the modules of the same job.
    assert all(callable(getattr(ame_hf, n)) for n in ("merge", "check", "tune", "evaluate", "from_pretrained"))
    import importlib

    for module in ("merging", "tuning"):  # importing a module must not shadow its package's function
        importlib.import_module(f"ame_hf.{module}")

    assert ame_hf.merge.__module__ == "ame_hf.merging" and ame_hf.tune.__module__ == "ame_hf.tuning"


def test_type_checkers_see_the_same_names():
    """The TYPE_CHECKING imports of ame_hf/__init__.py name exactly the public API, and py.typed ships."""
    import ast
    from pathlib import Path

    init = Path(ame_hf.__file__)
    tree = ast.parse(init.read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    names = sorted(a.asname or a.name for node in guarded.body for a in node.names)
    assert names == sorted(set(ame_hf.__all__) - {"__version__"})
    assert (init.parent / "py.typed").is_file()


def test_merge_with_keyword_options_and_hub_ingredients(hub, hub_token, tmp_path):
    a, b = make_finetunes(tmp_path / "ft", n=2)
    api = HfApi(token=hub_token)
    api.create_repo("org/api-a", exist_ok=True)
    sha = api.upload_folder(repo_id="org/api-a", folder_path=a).oid
    result = ame_hf.merge(["org/api-a", str(b)], tmp_path / "out", optimizer="rmsprop", lr=1e-3, progress=False)
    assert result.path == tmp_path / "out" and result.config.optimizer == "rmsprop"
    first, second = result.ingredients
    assert (first.repo_id, first.sha, first.revision) == ("org/api-a", sha, None)
    assert second.repo_id is None and second.path == b
    base = ame_hf.merge([str(a), str(b)], tmp_path / "o2", AmeConfig(optimizer="adam", lr=0.1), lr=0.01, progress=False)
    assert base.config.lr == 0.01  # keyword options override the config


def test_from_pretrained_and_push_a_model(hub, hub_token, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    paths = make_finetunes(tmp_path / "ft", n=2)
    model = ame_hf.from_pretrained(paths, model_class=AutoModelForCausalLM, optimizer="adam", lr=1e-3, progress=False)
    assert isinstance(model, LlamaForCausalLM)
    assert model.ame_config == AmeConfig(optimizer="adam", lr=1e-3).resolved()
    url = ame_hf.push_to_hub(model, "org/api-pushed", token=hub_token, private=True)
    assert url.endswith("org/api-pushed")
    files = HfApi(token=hub_token).list_repo_files("org/api-pushed")
    assert {"README.md", "ame_config.yaml", "model.safetensors", "config.json"} <= set(files)
