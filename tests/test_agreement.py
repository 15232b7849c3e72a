"""Agreement is exact (DESIGN §1, issue "Exact or refused" item 7): where every ingredient holds the same value and
the pivot comes from the ingredients (mean, first, an index), every pseudogradient is exactly zero and the output
is that value bit for bit, for every optimizer, batch size and pivot. (A decay term moves every weight whatever
its gradient: AdamW's `weight_decay` and ASGD's `lambd` are on by default in torch; with them at 0 agreement is
exact there too, and a merge with them says so.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import ame_hf
from ame_hf.engine import decay_arguments
from ame_hf.optimizers import OPTIMIZERS
from factories import load_state, make_finetunes

AGREED = "model.norm.weight"  # a frozen tensor: the same in every fine-tune
ROWS = slice(0, 5)            # untouched embedding rows: the same in every fine-tune


@pytest.fixture(scope="module")
def agreeing(tmp_path_factory):
    """Three fine-tunes that agree on one whole tensor and on some embedding rows, with values whose float32
    sum of three, divided by three, is not always the value (so a plain batch mean would show)."""
    folders = make_finetunes(tmp_path_factory.mktemp("agree"), n=3, scale=0.05)
    gen = torch.Generator().manual_seed(3)
    states = [load_state(f) for f in folders]
    shared = torch.randn(states[0][AGREED].shape, generator=gen) * 0.7 + 0.1
    rows = torch.randn(states[0]["model.embed_tokens.weight"][ROWS].shape, generator=gen) * 0.3
    for folder, state in zip(folders, states):
        state[AGREED] = shared.clone()
        state["model.embed_tokens.weight"][ROWS] = rows
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folders, shared, rows


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_optimizer_keeps_agreed_values_bit_for_bit(agreeing, optimizer, tmp_path):
    folders, shared, rows = agreeing
    for pivot, batch in (("mean", 3), ("first", 2), (2, 1), ("mean", 1)):
        out = tmp_path / f"{pivot}-{batch}"
        lr = {"lr": 0.01} if optimizer not in ("sgd", "asgd") else {}
        no_decay = {k: 0 for k in decay_arguments(optimizer, {})}
        ame_hf.merge(folders, out, optimizer=optimizer, pivot=pivot, batch_size=batch, progress=False,
                     optimizer_args=no_decay, **lr)
        merged = load_file(out / "model.safetensors")
        assert torch.equal(merged[AGREED], shared), (optimizer, pivot, batch)
        assert torch.equal(merged["model.embed_tokens.weight"][ROWS], rows), (optimizer, pivot, batch)


def test_a_decay_term_is_said_before_it_moves_agreed_weights(agreeing, tmp_path, caplog):
    assert decay_arguments("adamw", {}) == {"weight_decay": 0.01}
    assert decay_arguments("asgd", {}) == {"lambd": 0.0001}
    assert decay_arguments("adam", {}) == {} and decay_arguments("adamw", {"weight_decay": 0}) == {}
    with caplog.at_level("WARNING", logger="ame_hf"):
        ame_hf.merge(agreeing[0], tmp_path / "o", optimizer="adamw", lr=0.01, progress=False)
    assert any("weight_decay" in r.getMessage() and "agree" in r.getMessage() for r in caplog.records), caplog.text
