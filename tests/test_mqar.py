"""MQAR: the generator's guarantees, and that a tiny training run learns."""

from __future__ import annotations

import json

import pytest
import torch

from hippolm.cli import main as cli_main
from hippolm.tasks.mqar import IGNORE, MQARSettings, mqar_data, train_mqar


def test_deterministic_in_seed():
    a = mqar_data(50, 128, 16, seed=3)
    b = mqar_data(50, 128, 16, seed=3)
    c = mqar_data(50, 128, 16, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    state = torch.get_rng_state()
    mqar_data(5, 64, 4, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone


@pytest.mark.parametrize(("seq_len", "pairs"), [(64, 4), (256, 64), (130, 8)])
def test_structure_keys_values_and_answers(seq_len, pairs):
    V = 8192
    inputs, targets = mqar_data(40, seq_len, pairs, vocab_size=V, seed=1)
    assert inputs.shape == targets.shape == (40, seq_len)
    ctx = 2 * pairs
    keys, values = inputs[:, 0:ctx:2], inputs[:, 1:ctx:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for row in range(40):
        assert len(set(keys[row].tolist())) == pairs  # keys unique
        pos = (targets[row] != IGNORE).nonzero().flatten()
        assert len(pos) == pairs and (pos >= ctx).all() and ((pos - ctx) % 2 == 0).all()
        queried = inputs[row, pos]
        assert sorted(queried.tolist()) == sorted(keys[row].tolist())  # every key queried once
        for p, key in zip(pos.tolist(), queried.tolist(), strict=True):
            i = keys[row].tolist().index(key)
            assert targets[row, p] == values[row, i]  # the answer is the value paired earlier
    assert (targets[:, :ctx] == IGNORE).all()


def test_queries_follow_a_power_law():
    _, targets = mqar_data(2000, 256, 8, seed=0)
    slot = ((targets != IGNORE).nonzero()[:, 1] - 16) // 2  # 120 query slots
    counts = torch.bincount(slot, minlength=120).double()
    assert counts[:10].sum() > 2 * counts[-60:].sum()  # near slots far more likely than far ones
    assert counts[-60:].sum() > 0  # but far queries do occur


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="4 \\* num_pairs"):
        mqar_data(4, 60, 16)
    with pytest.raises(ValueError, match="too few keys"):
        mqar_data(4, 256, 20, vocab_size=32)


def test_tiny_attention_run_learns():
    settings = MQARSettings(mixer="attention", d_model=32, seq_len=32, pairs=(2, 4), vocab_size=64,
                            train_examples=2000, eval_examples=200, steps=60, batch_size=64, lr=3e-3, device="cpu")
    result = train_mqar(settings, progress=False)
    assert result["loss_last"] < result["loss_first"] - 0.5
    # 32 possible values: chance is 1/32 per query.
    assert result["mean_accuracy"] > 3 / 32
    assert set(result["accuracy"]) == {"2", "4"}


def test_attention_solves_tiny_mqar():
    """Regression: with every linear at std hidden_size ** -0.5, the attention and MLP output
    projections wrote unit-scale branches into the residual stream, ~8x the token embeddings, and a
    2-layer softmax-attention model stayed on MQAR's plateau (guessing among the context's values:
    accuracy ~1/2 and ~1/4 here) for 1000 steps. With output projections at an embedding's scale it
    solves this in 600 steps (seeds 0-4 all > 0.99; the old init stayed at ~0.4)."""
    settings = MQARSettings(mixer="attention", d_model=64, seq_len=16, pairs=(2, 4), vocab_size=32,
                            train_examples=20_000, eval_examples=300, steps=600, batch_size=32, lr=3e-3,
                            device="cpu")
    result = train_mqar(settings, progress=False)
    assert result["accuracy"]["2"] > 0.9 and result["accuracy"]["4"] > 0.9, result["accuracy"]


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli_main(["mqar", "--mixer", "loglinear_gdn", "--d-model", "16", "--seq-len", "16", "--pairs", "2,4",
                   "--vocab", "32", "--steps", "3", "--train-examples", "64", "--eval-examples", "8",
                   "--batch-size", "8", "--device", "cpu", "--quiet", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["settings"]["mixer"] == "loglinear_gdn" and set(result["accuracy"]) == {"2", "4"}
    assert "mean" in capsys.readouterr().out
