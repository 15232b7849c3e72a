"""Candidates that never touch the disk (issue 24): `tune` builds each AME candidate straight into a model in memory,
scores it and drops it; only its pick is written, by `merge` itself. References: `merge`'s own output on disk (the
same tensors, bit for bit), and the same evaluation of that output (the same score)."""

from __future__ import annotations

import pytest
import torch

import ame_hf.tuning as tuning
from ame_hf import AmeConfig, merge
from ame_hf.evaluation import evaluate_model, load_data
from ame_hf.in_memory import merge_model
from ame_hf.inputs import InputStage
from factories import load_state, weights_sha256


@pytest.mark.parametrize("cfg", [AmeConfig.soup(), tuning.default_grid()[1], tuning.default_grid()[4]],
                         ids=["soup", "adam-first-reverse", "sgd-momentum"])
def test_a_candidate_in_memory_holds_the_tensors_merge_writes(lm_experts, tmp_path, cfg):
    experts, val, _ = lm_experts
    val = load_data(val, "text-generation")
    model = merge_model(experts, cfg, "text-generation", stage=InputStage())
    written = load_state(merge(experts, tmp_path / "disk", cfg, progress=False).path)
    state = model.state_dict()
    assert all(torch.equal(state[k], written[k]) for k in written)
    # The same evaluation gives the same score: the model as from_pretrained builds it from the folder.
    assert evaluate_model(model, val, "text-generation") == evaluate_model(str(tmp_path / "disk"), val,
                                                                          "text-generation")


def test_tune_writes_only_its_pick_and_scores_as_the_disk_would(berts, tmp_path, monkeypatch):
    experts, val = berts
    data = load_data(val, "text-classification")
    writes = []
    real_merge = tuning.merge

    def counted(refs, target, *args, **kwargs):  # tune's own merges (the greedy soup's trials are selection's)
        writes.append(target)
        return real_merge(refs, target, *args, **kwargs)

    monkeypatch.setattr(tuning, "merge", counted)
    result = tuning.tune(experts, tmp_path / "best", data=val, budget=3, progress=False)
    ame = [c for c in result.candidates if c.config is not None and c.kept is None]
    assert len(ame) == 4
    for n, cand in enumerate(ame):  # each score is the score of merge's output for its config
        path = real_merge(experts, tmp_path / f"ref{n}", cand.config, progress=False).path
        assert cand.score == evaluate_model(str(path), data, "text-classification", "accuracy"), cand.label
    picked_ame = result.best.config is not None and result.best.kept is None
    assert len(writes) == (1 if picked_ame else 0)
    if picked_ame:
        fresh = real_merge(experts, tmp_path / "fresh", result.best.config, progress=False).path
        assert weights_sha256(result.path) == weights_sha256(fresh)
