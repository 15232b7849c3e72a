"""Classifiers that name the same labels in another `id2label` order (issue 21 item 3): the head's rows are
matched by label name (found from the model class: the tensors with a row per label), the output's id2label says
the order of its rows, and a different label set is refused by name. Checked on what transformers loads: the
float64 mean of each label's rows, the whole-model Adam reference, and `pipeline("text-classification")`."""

from __future__ import annotations

import json

import pytest
import torch

from ame_hf import AmeConfig, check, merge
from factories import cli_error_line, tiny_bert_config, tiny_tokenizer
from test_engine import reference_ame_states

COLORS = ["red", "green", "blue"]
ORDERS = [["red", "green", "blue"], ["blue", "red", "green"], ["green", "blue", "red"]]
HEAD = ("classifier.weight", "classifier.bias")


def save_classifier(model, folder, order):
    """`model` (labels in COLORS order) saved with its labels in `order`: the same classifier, other row ids."""
    from transformers import BertForSequenceClassification

    copy = BertForSequenceClassification(model.config)
    copy.load_state_dict(model.state_dict())
    index = torch.tensor([COLORS.index(c) for c in order])
    with torch.no_grad():
        copy.classifier.weight.copy_(model.classifier.weight[index])
        copy.classifier.bias.copy_(model.classifier.bias[index])
    copy.config.id2label = dict(enumerate(order))
    copy.config.label2id = {c: i for i, c in enumerate(order)}
    copy.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """Three fine-tunes of one base, each saved with its labels in another order; and one of other labels."""
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("labels")
    config = tiny_bert_config(vocab_size=len(tiny_tokenizer()), num_labels=3,
                              id2label=dict(enumerate(COLORS)), label2id={c: i for i, c in enumerate(COLORS)})
    folders = []
    for i, order in enumerate(ORDERS):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        folders.append(save_classifier(model, root / f"cls{i}", order))
    other = save_classifier(model, root / "other", COLORS)
    config = json.loads((other / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "red", "1": "green", "2": "yellow"}, {"red": 0, "green": 1, "yellow": 2}
    (other / "config.json").write_text(json.dumps(config))
    return folders, other


def loaded(folder):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder)


def in_order(model, order):
    """The model's state dict with its head's rows in the label order `order`."""
    state = model.state_dict()
    index = torch.tensor([model.config.label2id[c] for c in order])
    return {k: (v[index] if k in HEAD else v) for k, v in state.items()}


def test_the_soup_matches_head_rows_by_label_name(classifiers, tmp_path):
    from transformers import pipeline

    folders, _ = classifiers
    report = check(folders)
    assert report.ok, report.errors
    assert any("labels matched by name" in n and "classifier.weight" in n for n in report.notes), report.notes
    assert not any(n.startswith("config id2label") for n in report.notes), report.notes
    out = merge(folders, tmp_path / "soup", optimizer="sgd", progress=False).path
    merged = loaded(out)
    order = [merged.config.id2label[i] for i in range(3)]
    assert order == ORDERS[0]  # the config source's order
    states = [in_order(loaded(f), order) for f in folders]
    expected = {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}
    for name, value in merged.state_dict().items():
        assert torch.allclose(value.double(), expected[name], atol=1e-6), name
    # The labels a pipeline gives are the merged rows' labels.
    reference = loaded(folders[0])
    reference.load_state_dict({k: v.float() for k, v in expected.items()})
    reference.config.id2label, reference.config.label2id = dict(enumerate(order)), {c: i for i, c in enumerate(order)}
    tokenizer = tiny_tokenizer()
    text = "the red cat sits"

    def scores(classify):
        found = classify([text], top_k=None)[0]
        return {r["label"]: r["score"] for r in found}

    got = scores(pipeline("text-classification", model=str(out)))
    want = scores(pipeline("text-classification", model=reference, tokenizer=tokenizer))
    assert set(got) == set(COLORS) and all(abs(got[c] - want[c]) < 1e-5 for c in COLORS), (got, want)


@pytest.mark.parametrize("pivot", ["mean", 1])
def test_adam_over_reordered_labels_equals_the_whole_model_reference(classifiers, tmp_path, pivot):
    folders, _ = classifiers
    config = AmeConfig(optimizer="adam", lr=0.01, epochs=2, pivot=pivot)
    out = merge(folders, tmp_path / "adam", config, progress=False).path
    merged = loaded(out)
    order = [merged.config.id2label[i] for i in range(3)]
    assert order == ORDERS[1 if pivot == 1 else 0]  # the output's config (and order) is the pivot's ingredient's
    expected = reference_ame_states([in_order(loaded(f), order) for f in folders], config)
    for name, value in expected.items():
        assert torch.allclose(merged.state_dict()[name].double(), value.double(), atol=1e-6), name


def test_a_different_label_set_is_refused_naming_the_labels(classifiers, capsys):
    folders, other = classifiers
    report = check([folders[0], other])
    assert not report.ok
    line = report.errors[0]
    assert "'yellow'" in line and "'blue'" in line and str(other) in line and "id2label" in line, line
    cli_error_line(capsys, "merge", folders[0], other, "--out", other.parent / "never", "--quiet",
                   needles=["labels", "'yellow'"])


def test_hub_classifiers_checked_from_headers_merge_as_local_ones(classifiers, hub, hub_token, tmp_path):
    """The label order found by the check (from headers) holds once the weights are downloaded and opened."""
    from factories import load_state, upload_to_hub

    folders, _ = classifiers
    repos = upload_to_hub(hub_token, {f"org/labels-{i}": folder for i, folder in enumerate(folders[:2])})
    hub_out = merge(repos, tmp_path / "hub", optimizer="sgd", progress=False).path
    local_out = merge(folders[:2], tmp_path / "local", optimizer="sgd", progress=False).path
    hub_state, local_state = load_state(hub_out), load_state(local_out)
    assert set(hub_state) == set(local_state) and all(torch.equal(hub_state[k], local_state[k]) for k in hub_state)
    states = [in_order(loaded(f), ORDERS[0]) for f in folders[:2]]
    for name in HEAD:
        assert torch.allclose(hub_state[name].double(), (states[0][name].double() + states[1][name].double()) / 2,
                              atol=1e-6), name
