"""One interface (issue 20): every option of `merge`, `check`, `evaluate`, `tune` and `push` exists under the same
name and meaning in the CLI (`cli.build_parser()`) and the Python API (`ame_hf.merge/check/evaluate/tune/
push_to_hub`), or is listed below with the reason it does not; `AmeConfig`'s fields are walked per command; the
Space's API endpoints take the same keywords; the README's table names every flag. Then the options that were missing or meant something else, for real:
`check --tokenizer-source`, `check` pivot keywords, `evaluate --device`, `push_to_hub` -> `PushInfo`."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

import ame_hf
from ame_hf import AmeConfig, InvalidConfigError, PushInfo
from ame_hf._cli_errors import RENAMED, flag
from ame_hf.cli import build_parser, main
from ame_hf.config import CHECK_FIELDS, OUTPUT_FIELDS, WEIGHT_FIELDS
from factories import make_finetunes, run_cli

API = {"merge": ame_hf.merge, "check": ame_hf.check, "evaluate": ame_hf.evaluate, "tune": ame_hf.tune,
       "push": ame_hf.push_to_hub}
FIELDS = [f.name for f in dataclasses.fields(AmeConfig)]

# The AmeConfig fields each command takes (the CLI as flags; Python as keywords, or inside config=), and why the
# others are not options of that command.
FIELDS_OF = {"merge": FIELDS, "check": list(CHECK_FIELDS), "evaluate": ["base"], "tune": list(OUTPUT_FIELDS),
             "push": []}
WHY_NOT_A_FIELD = {
    "check": "changes the arithmetic or the writing of a merge, not what is read or compared",
    "evaluate": "evaluate merges nothing; only the adapters' base decides what an adapter scores as",
    "tune": "tune tries its own AME variants (grid=); only output options reach its merges",
    "push": "push uploads a finished output",
}
# Where an AmeConfig field reaches the Python function when it is no keyword of its own.
FIELDS_VIA = {"merge": "**options", "tune": "config"}

# The same name with another meaning in each interface: neither maps to the other.
OTHER_MEANING = {
    ("merge", "config"): "the CLI's --config is a YAML file, Python's config= an AmeConfig (its fields are the flags)",
}

# CLI options with no Python keyword of the same name and meaning, and why.
CLI_ONLY = {
    ("merge", "--config"): OTHER_MEANING["merge", "config"],
    ("merge", "--revision"): "the deprecated spelling of --push-branch (read as the ingredients' revision)",
    **{("merge", f): "merge, then ame_hf.push_to_hub(result, repo_id, ...), which has these keywords"
       for f in ("--push", "--repo-id", "--private", "--push-branch", "--create-pr", "--commit-message")},
    **{("merge", f): "merge's evaluation: ame_hf.evaluate(...) after the merge, or ame_hf.greedy_soup(...)"
       for f in ("--eval-data", "--greedy-soup", "--task", "--metric", "--max-length", "--eval-batch-size",
                 "--test-data", "--lm-eval-tasks", "--lm-eval-include", "--lm-eval-metric", "--lm-eval-limit",
                 "--lm-eval-num-fewshot")},
    **{(c, "--quiet"): "progress=False where Python shows progress; logging's level for the messages"
       for c in API},
    **{(c, "--debug"): "Python raises the exception itself, traceback and cause included" for c in API},
    ("check", "--json"): "Python returns the report object: report.to_dict() is that JSON",
    ("check", "--verbose"): "Python returns the report object: report.format(verbose=True) prints it all",
    ("evaluate", "--update-card"): "writes the printed table into a model card; Python returns the scores",
}
# Python keywords with no CLI option of the same name and meaning, and why.
PYTHON_ONLY = {
    ("merge", "config"): OTHER_MEANING["merge", "config"],
    ("merge", "callback"): "a function called with the progress; the CLI shows a progress bar",
    ("merge", "stage"): "an InputStage shared between the merges of one Python run (tune's); a command runs one",
    ("merge", "recorded_at"): "where a Python caller will move the output (tune's pick); a command writes --out",
    ("tune", "grid"): "a list of AmeConfig objects; the CLI tries the default grid",
    ("tune", "config"): "an AmeConfig of output options; the CLI takes them as flags (--dtype, ...)",
    ("tune", "log"): "a function called with each line the CLI prints",
    **{(c, "progress"): "the CLI's --quiet turns it off" for c in ("merge", "evaluate", "tune")},
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _cli_options(command: str) -> dict[str, argparse.Action]:
    """Each option of a command by its flag (`--out`), positional arguments by their metavar (`REF`)."""
    out = {}
    for action in _subparsers()[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        out[action.option_strings[-1] if action.option_strings else (action.metavar or action.dest.upper())] = action
    return out


def _keywords(command: str) -> list[str]:
    return [p.name for p in inspect.signature(API[command]).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def _field_flag(field: str) -> str:
    """An AmeConfig field's flag, the same in every command (`batch_size` is `--batch-size`, never
    `--eval-batch-size`, the evaluation's `batch_size=`)."""
    return "--" + field.replace("_", "-")


def _matched(command: str) -> dict[str, str]:
    """Python keyword (and AmeConfig field the command takes) -> its CLI option, where one of that meaning exists."""
    cli = _cli_options(command)
    pairs = [*((k, flag(command, k)) for k in _keywords(command)), *((f, _field_flag(f)) for f in FIELDS_OF[command])]
    return {k: option for k, option in pairs if option in cli and (command, k) not in OTHER_MEANING}


def _one_sided(found: list[str], matched: set[str], listed: dict[tuple[str, str], str], command: str) -> list[str]:
    """The options of one interface that have no match in the other, and are not listed with a reason; and the
    listed ones that no longer need to be (gone, or matched now)."""
    missing = [o for o in found if o not in matched and (command, o) not in listed]
    stale = [o for c, o in listed if c == command and (o not in found or o in matched)]
    return missing + [f"{o} (listed, but not one-sided)" for o in stale]


@pytest.mark.parametrize("command", sorted(API))
def test_every_option_is_in_both_interfaces_or_listed_with_a_reason(command):
    matched = _matched(command)
    python = _one_sided(_keywords(command), set(matched), PYTHON_ONLY, command)
    assert not python, f"{command}: Python keywords with no CLI option and no listed reason: {python}"
    cli = _one_sided(list(_cli_options(command)), set(matched.values()), CLI_ONLY, command)
    assert not cli, f"{command}: CLI options with no Python keyword and no listed reason: {cli}"


@pytest.mark.parametrize("command", sorted(API))
def test_ameconfig_fields_are_options_of_a_command_or_have_a_reason(command):
    """Each field the command takes is a flag of it with merge's own help (same name, same meaning), and reaches
    the Python function as a keyword or through `config=` / `**options`; the others have a reason."""
    cli, keywords = _cli_options(command), _keywords(command)
    merge_help = {f: _cli_options("merge")[_field_flag(f)].help for f in FIELDS}
    params = inspect.signature(API[command]).parameters
    for field in FIELDS:
        if field in FIELDS_OF[command]:
            assert _field_flag(field) in cli, f"{command} lacks {_field_flag(field)}"
            assert cli[_field_flag(field)].help == merge_help[field], f"{command} {field}: another meaning"
            via = FIELDS_VIA.get(command)
            assert field in keywords or (via == "**options" and any(p.kind == p.VAR_KEYWORD for p in params.values())
                                         ) or via in keywords, f"{command}: {field} cannot be given from Python"
        else:
            assert _field_flag(field) not in cli, f"{command} has {_field_flag(field)}: list it in FIELDS_OF"
            assert WHY_NOT_A_FIELD.get(command), f"{command}: no reason why it lacks {field}"
    assert set(WEIGHT_FIELDS).isdisjoint(FIELDS_OF["tune"]) and set(CHECK_FIELDS) <= set(FIELDS_OF["merge"])


# Keywords of what a command calls, renamed for its errors: `merge --eval-data` runs `ame_hf.evaluate(data=...)`.
CALLEE_KEYWORDS = {("merge", "data"): "merge --eval-data scores with ame_hf.evaluate(data=...)"}


def test_the_renames_name_real_options_and_every_reason_is_written():
    for command, renames in RENAMED.items():
        for keyword, cli_form in renames.items():
            assert keyword in _keywords(command) or (command, keyword) in CALLEE_KEYWORDS, (command, keyword)
            assert cli_form in _cli_options(command), (command, keyword)
    assert all(reason.strip() for reason in [*CLI_ONLY.values(), *PYTHON_ONLY.values(), *WHY_NOT_A_FIELD.values()])


def test_public_functions_document_every_keyword():
    for command, fn in API.items():
        doc = inspect.getdoc(fn) or ""
        assert "Returns:" in doc and "Raises:" in doc, command
        undocumented = [k for k in _keywords(command) if not re.search(rf"\b{k}\b", doc)]
        assert not undocumented, f"{fn.__name__} does not document {undocumented}"


def test_the_readme_table_names_every_option():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## One interface", 1)[1].split("\n## ", 1)[0]
    quoted = " ".join(re.findall(r"`([^`]*)`", section))  # what the table puts in code spans
    for command in API:
        for option in _cli_options(command):
            if option.startswith("--"):
                assert re.search(rf"{option}(?![\w-])", quoted), f"README's interface table lacks {command} {option}"
        for keyword in _keywords(command):
            assert re.search(rf"\b{keyword}\b", quoted), f"README's interface table lacks {command}'s {keyword}="


# Python keywords (and AmeConfig fields of the command) that are no parameter of the Space's API endpoint, and why.
NOT_IN_SPACE = {
    **{(c, "out_dir"): "a fresh folder per run, which Push uploads" for c in ("merge", "tune")},
    **{(c, "overwrite"): "a fresh folder per run: nothing to replace" for c in ("merge", "tune")},
    **{(c, "device"): "the Space's hardware decides" for c in ("merge", "evaluate", "tune")},
    **{("merge", k): "the Space's hardware decides" for k in ("max_memory", "threads")},
    **{(c, "progress"): "the Space shows its own progress bar" for c in ("merge", "evaluate", "tune")},
    ("merge", "callback"): "a Python function; it feeds the Space's progress bar",
    ("tune", "log"): "a Python function; it feeds the Space's progress bar",
    **{(c, "resume"): "a Space run writes a fresh folder and is not restarted by a command: nothing to resume"
       for c in ("merge", "tune")},
    ("merge", "stage"): "an InputStage shared by the merges of one Python run; a Space run is one run",
    ("merge", "recorded_at"): "where a Python caller will move the output; the Space writes its own folder",
    ("merge", "config"): "an AmeConfig: its fields are the form's boxes",
    ("tune", "config"): "an AmeConfig of output options: they are the Advanced options' boxes",
    ("tune", "grid"): "a list of AmeConfig objects; the Space tries the default grid, Budget sets its size",
    ("tune", "selection"): "the Space selects with tune's default (guarded: the soup unless a candidate beats it "
                           "beyond validation noise), which its summary explains",
    ("push", "source"): "the latest Merge or Tune result of the session",
}


def test_the_space_endpoints_take_the_librarys_keywords():
    """Each parameter of a Space API endpoint is the Python keyword (or AmeConfig field) of that name and meaning;
    every keyword the endpoint lacks is listed above with the reason."""
    from ame_hf.space import build_app

    endpoints = build_app(allow_local_paths=False).get_api_info()["named_endpoints"]
    for command in API:
        space = [p["parameter_name"] for p in endpoints[f"/{command}"]["parameters"]]
        python = set(_keywords(command)) | set(FIELDS_OF[command])
        assert [p for p in space if p not in python] == [], f"/{command} takes what {command} does not"
        assert sorted(python - set(space)) == sorted(k for c, k in NOT_IN_SPACE if c == command), command


# -- the options that were missing, or meant something else ---------------------------------------------------

@pytest.fixture(scope="module")
def vocabularies(tmp_path_factory):
    """Two tiny llamas whose vocabularies differ (the second added a token), each with its tokenizer, and a
    folder with weights but no tokenizer."""
    from transformers import AddedToken

    from factories import build_base, tiny_tokenizer

    root = tmp_path_factory.mktemp("vocab")
    folders = []
    for i, added in enumerate([[], ["<extra>"]]):
        tok = tiny_tokenizer()
        tok.add_tokens([AddedToken(t) for t in added])
        torch.manual_seed(i)
        model = build_base("llama", vocab_size=len(tok))
        model.save_pretrained(root / f"ft{i}")
        tok.save_pretrained(root / f"ft{i}")
        folders.append(root / f"ft{i}")
    bare = make_finetunes(root / "bare", n=1)[0]
    return folders, bare


def test_check_takes_the_tokenizer_source_as_merge_does(vocabularies, capsys):
    (a, b), bare = vocabularies
    assert ame_hf.check([a, b]).ok  # auto: the union of the vocabularies
    report = ame_hf.check([a, b], tokenizer_source=bare)
    assert not report.ok and any("holds no tokenizer" in e for e in report.errors), report.errors
    assert ame_hf.check([a, b], tokenizer_source=1).ok
    code, out, _ = run_cli(capsys, "check", a, b, "--tokenizer-source", bare)
    assert code == 1 and "holds no tokenizer" in out
    assert run_cli(capsys, "check", a, b, "--tokenizer-source", "first")[0] == 0


def test_check_reads_pivot_keywords_as_merge_does(llamas, tmp_path, capsys):
    """`first`, `mean` and an index are pivots among the ingredients (before, `first` was asked of the Hub as a
    repo); `--pivot REF` is checked with them; an index must name an ingredient."""
    for pivot in ("first", "FIRST", "mean", 1, "2"):
        assert ame_hf.check(llamas, pivot=pivot).ok, pivot
    assert run_cli(capsys, "check", *llamas, "--pivot", "first")[0] == 0
    wide = make_finetunes(tmp_path / "wide-pivot", n=1, intermediate_size=48)[0]
    report = ame_hf.check(llamas, pivot=wide)
    assert not report.ok and "[48, 16] in the pivot" in " ".join(report.errors), report.errors
    with pytest.raises(InvalidConfigError) as caught:
        ame_hf.check(llamas, pivot=3)
    assert caught.value.field == "pivot" and "0..2" in str(caught.value) and "--" not in str(caught.value)


def test_evaluate_takes_device(classifiers, capsys):
    experts, val = classifiers
    code, out, err = run_cli(capsys, "evaluate", experts[0], "--data", val, "--device", "cpu", "--quiet")
    assert code == 0, err
    # The device reaches the evaluation: a GPU this machine lacks fails there, in one line.
    code, _, err = run_cli(capsys, "evaluate", experts[0], "--data", val, "--device", "cuda:7", "--quiet")
    assert code == 1 and "ame-hf: error: " in err and ("CUDA" in err or "cuda" in err), err


def test_push_to_hub_returns_push_info(hub, hub_token, tmp_path):
    a, b = make_finetunes(tmp_path / "ft", n=2)
    result = ame_hf.merge([a, b], tmp_path / "m", progress=False)
    info = ame_hf.push_to_hub(result, "org/interface-pushed", token=hub_token)
    assert isinstance(info, PushInfo) and info.changed and info.url.endswith("org/interface-pushed")
    head = HfApi(token=hub_token).repo_info("org/interface-pushed").sha
    assert info.commit == head and str(info) == info.url == f"{info}"
    again = ame_hf.push_to_hub(result.path, "org/interface-pushed", token=hub_token)
    assert not again.changed and again.commit == head
    with pytest.raises(AttributeError):
        info.url = "elsewhere"  # type: ignore[misc]
