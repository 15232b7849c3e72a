"""The model card (ame_hf/card.py) as a Hub user reads it: How to use, a Reproduce command that really
reproduces, the real output dtype, no optimizer implementation switches, honest `tune` cards, metadata
(base_model, license) that survives `ModelCard.load`."""

from __future__ import annotations

import re
import shlex

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard

from ame_hf import merge
from ame_hf.card import _auto_class, reproduce_command
from ame_hf.cli import main
from factories import make_finetunes

SHA = re.compile(r"@[0-9a-f]{40}$")


def card_of(path) -> ModelCard:
    return ModelCard.load(path / "README.md")


def reproduce_line(card: ModelCard) -> str:
    section = card.text.split("## Reproduce", 1)[1]
    return next(line for line in section.splitlines() if line.startswith("ame-hf merge ") and "--config" not in line)


def file_bytes(path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.name.endswith((".safetensors", ".json"))}


@pytest.mark.parametrize("options", [
    [],
    ["--optimizer", "sgd"],
    ["--optimizer", "adamw", "--lr", "3e-4", "--optimizer-args", '{"betas": [0.8, 0.95], "foreach": false}',
     "--shuffle", "--seed", "5", "--epochs", "2", "--pivot", "1", "--max-shard-size", "12KB"],
    ["--optimizer", "rmsprop", "--relative-lr", "0.05", "--batch-size", "2", "--compute-dtype", "float64",
     "--dtype", "bfloat16", "--allow-nonfinite"],
])
def test_reproduce_command_gives_the_same_weight_bytes(llamas, tmp_path, options, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the command is run from where the merge was run
    first = tmp_path / "first"
    assert main(["merge", *map(str, llamas), "--out", str(first), "--quiet", "--threads", "1", "--device", "cpu",
                 "--overwrite", *options]) == 0
    command = reproduce_line(card_of(first))
    argv = shlex.split(command)
    assert argv[:2] == ["ame-hf", "merge"] and argv[argv.index("--out") + 1] == "merged"
    for local_only in ("--quiet", "--threads", "--device", "--overwrite", "--push", "--token"):
        assert local_only not in argv, command
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    assert main(argv[1:] + ["--quiet"]) == 0, command
    assert file_bytes(tmp_path / "again") == file_bytes(first), command
    assert (tmp_path / "again" / "ame_config.yaml").read_text() == (first / "ame_config.yaml").read_text()


def test_reproduce_pins_hub_refs_and_a_checkpoint_pivot(hub, hub_token, tmp_path):
    api = HfApi(token=hub_token)
    a, b = make_finetunes(tmp_path / "src", n=2, seed=7)
    shas = {}
    for name, folder in (("org/card-a", a), ("org/card-b", b)):
        api.create_repo(name, exist_ok=True)
        shas[name] = api.upload_folder(repo_id=name, folder_path=folder).oid
    api.create_tag("org/card-a", tag="v1")
    result = merge(["org/card-a@v1", "org/card-b@main"], tmp_path / "m", pivot="org/card-b@main",
                   optimizer="adagrad", lr=0.01, progress=False)
    command = reproduce_command(result)
    argv = shlex.split(command)
    assert argv[2:4] == [f"org/card-a@{shas['org/card-a']}", f"org/card-b@{shas['org/card-b']}"]
    assert argv[argv.index("--pivot") + 1] == f"org/card-b@{shas['org/card-b']}"
    assert "@v1" not in command and "@main" not in command
    assert command in card_of(result.path).text
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    assert main(argv[1:] + ["--quiet"]) == 0
    from factories import load_state

    again, first = load_state(tmp_path / "again"), load_state(result.path)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_merge_card_how_to_use_dtype_hyperparameters_and_metadata(llamas, berts, tmp_path):
    result = merge(llamas, tmp_path / "my-merge", optimizer="adam", optimizer_args={"foreach": False}, progress=False)
    card = card_of(result.path)
    usage = card.text.split("## How to use", 1)[1].split("\n## ", 1)[0]
    assert "from transformers import AutoModelForCausalLM" in usage
    assert 'AutoModelForCausalLM.from_pretrained("my-merge")' in usage and "repo ID" in usage
    assert "| output dtype | float32" in card.text and "| output dtype | auto" not in card.text
    for switch in ("foreach", "fused", "capturable", "differentiable"):
        assert f"| {switch} |" not in card.text, switch
    resolved = yaml.safe_load((result.path / "ame_config.yaml").read_text())["resolved"]["hyperparameters"]
    assert "betas" in resolved and not {"foreach", "fused", "capturable", "differentiable"} & set(resolved)
    assert yaml.safe_load((result.path / "ame_config.yaml").read_text())["optimizer_args"] == {"foreach": False}
    data = card.data.to_dict()
    assert data["tags"] == ["ame-hf", "merge", "model-ensembling"] and data["pipeline_tag"] == "text-generation"
    assert "base_model" not in data and "base_model_relation" not in data  # local ingredients only

    bf16 = make_finetunes(tmp_path / "bf", n=2, dtype=torch.bfloat16)
    assert "| output dtype | bfloat16" in card_of(merge(bf16, tmp_path / "bfm", progress=False).path).text

    experts, _ = berts
    card = card_of(merge(experts, tmp_path / "cls", optimizer="sgd", progress=False).path)
    assert 'AutoModelForSequenceClassification.from_pretrained("cls")' in card.text
    assert card.data.pipeline_tag == "text-classification"


def test_auto_class_from_the_architecture():
    assert _auto_class({"architectures": ["LlamaForCausalLM"]}) == ("AutoModelForCausalLM", "text-generation")
    assert _auto_class({"architectures": ["GPT2LMHeadModel"]})[0] == "AutoModelForCausalLM"
    assert _auto_class({"architectures": ["T5ForConditionalGeneration"]})[0] == "AutoModelForSeq2SeqLM"
    assert _auto_class({"architectures": ["ViTForImageClassification"]})[0] == "AutoModelForImageClassification"
    assert _auto_class({"architectures": ["BertModel"]}) == ("AutoModel", None)
    assert _auto_class({}) == ("AutoModel", None)


def test_hub_card_metadata_round_trip(hub, hub_token, tmp_path):
    api = HfApi(token=hub_token)
    a, b = make_finetunes(tmp_path / "src", n=2, seed=9)
    for name, folder in (("org/card-rt-a", a), ("org/card-rt-b", b)):
        api.create_repo(name, exist_ok=True)
        api.upload_folder(repo_id=name, folder_path=folder)
    result = merge(["org/card-rt-a", "org/card-rt-b"], tmp_path / "m", progress=False)
    loaded = ModelCard.load(result.path / "README.md")
    data = loaded.data.to_dict()
    assert data["base_model"] == ["org/card-rt-a", "org/card-rt-b"] and data["base_model_relation"] == "merge"
    assert data["tags"] == ["ame-hf", "merge", "model-ensembling"] and data["pipeline_tag"] == "text-generation"
    assert loaded.data.eval_results is None
    # Saved again, it is the same card: the metadata is plain, valid YAML for the Hub.
    loaded.save(tmp_path / "again.md")
    assert ModelCard.load(tmp_path / "again.md").data.to_dict() == data


def test_license_only_when_ingredients_agree(repos, tmp_path):
    result = merge(["org/hub-a", "org/hub-b"], tmp_path / "m", progress=False)
    assert ModelCard.load(result.path / "README.md").data.license == "apache-2.0"
    local = make_finetunes(tmp_path / "local", n=1)[0]  # no card, so no licence to agree on
    result = merge(["org/hub-a", str(local)], tmp_path / "m2", progress=False)
    card = ModelCard.load(result.path / "README.md")
    assert card.data.license is None and card.data.base_model == ["org/hub-a"]


def test_pivot_base_model_from_hub_is_in_base_model(repos, tmp_path):
    result = merge(["org/hub-a", "org/hub-b"], tmp_path / "m", pivot="org/hub-a@v2", progress=False)
    card = ModelCard.load(result.path / "README.md")
    assert card.data.base_model == ["org/hub-a", "org/hub-b"]  # pivot repo already listed
    assert repos["shas"]["a-v2"] in card.text


def _tune_with_scores(monkeypatch, experts, val, out, winner):
    """`tune` with real merges but scores fixed by candidate, so the winner is known."""
    import ame_hf.tuning as tune_module

    def fake_score(model, data, task, metric=None, **kwargs):
        # A candidate built in memory is named like the folder it would have had (`cand{n}`).
        return 0.9 if winner(str(getattr(model, "ame_candidate", model))) else 0.5

    monkeypatch.setattr(tune_module, "evaluate_model", fake_score)
    return tune_module.tune(experts, out, data=val, budget=2, progress=False)


def test_tune_ame_winner_card_says_it_was_selected(berts, tmp_path, monkeypatch):
    experts, val = berts
    out = tmp_path / "best"
    result = _tune_with_scores(monkeypatch, experts, val, out, winner=lambda path: "cand1" in path)
    assert result.best.config is not None and not result.best.config.is_soup
    card = ModelCard.load(out / "README.md")
    assert "selected by `ame-hf tune`** from 6 candidates" in card.text  # 2 ingredients, soups, budget 2
    assert "validation scores used for the selection" in card.text and "not an independent evaluation" in card.text
    assert "## Evaluation results" not in card.text
    assert 'from_pretrained("best")' in card.text  # the How to use names the output, not a scratch folder
    [ev] = card.data.eval_results
    assert ev.metric_value == 0.9 and ev.dataset_split == "validation" and "used for selection" in ev.metric_name
    data = card.data.to_dict()
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.9
    assert "model-selection" in data["tags"] and data["pipeline_tag"] == "text-classification"
    reproduce_line(card)  # still there


def test_tune_single_ingredient_card_says_it_was_selected(berts, tmp_path, monkeypatch):
    experts, val = berts
    out = tmp_path / "best"
    result = _tune_with_scores(monkeypatch, experts, val, out, winner=lambda path: path == str(experts[1]))
    assert result.best.ingredient == 1
    card = ModelCard.load(out / "README.md")
    assert "selected by `ame-hf tune`** from 6 candidates" in card.text
    assert "validation scores used for the selection" in card.text
    data = card.data.to_dict()
    assert "model-selection" in data["tags"] and data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.9
    assert card.data.eval_results[0].dataset_split == "validation"


@pytest.mark.parametrize("soup_on_val", [0.95, 0.1])
def test_greedy_soup_card_with_held_out_data(berts, tmp_path, monkeypatch, soup_on_val):
    """With `test_data`, the greedy soup's card and model-index carry its held-out score beside the best ingredient's;
    when only the best ingredient is kept (the soup scores worse), the output is that ingredient, scored once."""
    import ame_hf.selection as selection
    from ame_hf.evaluation import load_data

    experts, val = berts
    test = load_data(val, "text-classification")
    on_test: list[str] = []

    def score(model, data, task, metric=None, **kwargs) -> float:
        if data is test:
            on_test.append(str(model))
            return 0.7 if str(model) == str(experts[1]) else 0.8
        return {str(experts[0]): 0.5, str(experts[1]): 0.9}.get(str(model), soup_on_val)

    monkeypatch.setattr(selection, "evaluate_model", score)
    result = selection.greedy_soup(experts, tmp_path / "greedy", data=val, test_data=test)
    kept_both = soup_on_val > 0.9
    assert result.kept == ([0, 1] if kept_both else [1])
    assert result.test_scores == {"greedy soup": 0.8 if kept_both else 0.7, "best ingredient": 0.7}
    assert len(on_test) == (2 if kept_both else 1) and on_test[0] == str(experts[1])
    card = card_of(result.path)
    [ev] = card.data.eval_results
    assert ev.metric_value == result.test_scores["greedy soup"] and ev.dataset_split == "test"
    assert "selected by the greedy soup" in card.text and "## Greedy soup" in card.text
    assert f"| best ingredient: {experts[1]} | 0.7000 |" in card.text
    assert f"| greedy soup (kept {', '.join(map(str, result.kept))}) | {result.score:.4f} |" in card.text


def test_the_project_url_is_set_once_in_the_package_metadata():
    """Issue 23 item 9: the card and the Space link the URL of setup.cfg (the package metadata), and the Space's
    requirements install from it; the fallback for an uninstalled tree is the same URL."""
    import configparser
    from pathlib import Path

    from ame_hf._model_files import PROJECT_URL, project_url

    root = Path(__file__).parent.parent
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    url = setup["metadata"]["url"]
    assert project_url() == url == PROJECT_URL
    assert "{{ project_url }}" in (root / "model_cards" / "ame_model_card.md").read_text()
    assert f"git+{url}.git" in (root / "examples" / "space" / "requirements.txt").read_text()
