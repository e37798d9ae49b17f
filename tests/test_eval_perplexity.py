"""Perplexity by position (chunked) against one-shot forwards; systems full / swa / ahn; batched generation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from eval_tiny import char_tokenizer, tiny_llama

from hippolm import AHNForCausalLM
from hippolm.eval import generate_batch, make_systems, memory_disabled, perplexity_by_position
from hippolm.eval.perplexity import bucket_edges
from hippolm.eval.runner import memory_is_trained

VOCAB = 128


def random_memory(model: AHNForCausalLM, seed: int = 1) -> AHNForCausalLM:
    """Non-zero memory read-out, so the memory changes the logits (as in tests/test_ahn.py)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.memory_state_dict().items():
            if name.endswith("ahn.o_proj"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def bucket_ppl(logits: torch.Tensor, ids: torch.Tensor, ranges) -> list[float]:
    """Reference: per-token NLL from one full forward, averaged per bucket of target positions."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten(), reduction="none")
    nll = nll.view(ids.shape[0], -1)
    return [math.exp(nll[:, max(lo - 1, 0):hi - 1].mean().item()) for lo, hi in ranges]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    base = tiny_llama(VOCAB)
    ids = torch.randint(3, VOCAB, (2, 160))
    with torch.no_grad():
        full_logits = base(ids).logits
    model = random_memory(AHNForCausalLM.from_base(copy.deepcopy(base), "gdn", window=16, sinks=2))
    return base, model, ids, full_logits


def test_bucket_edges():
    assert bucket_edges([2048, 8192]) == [(0, 2048), (2048, 8192)]
    assert bucket_edges([0, 10, 20]) == [(0, 10), (10, 20)]
    for bad in ([], [0], [10, 5], [-1, 4]):
        with pytest.raises(ValueError):
            bucket_edges(bad)


def test_hf_model_chunked_equals_one_forward(setup):
    base, _, ids, full_logits = setup
    r = perplexity_by_position(base, ids, [40, 100, 160], chunk_size=23, progress=False)
    expected = bucket_ppl(full_logits, ids, [(0, 40), (40, 100), (100, 160)])
    assert r["ppl"] == pytest.approx(expected, rel=1e-5)
    assert r["tokens"] == [2 * 39, 2 * 60, 2 * 60]  # position 0 has no loss
    assert r["overall"]["tokens"] == 2 * 159 and r["documents"] == 2
    with pytest.raises(ValueError, match="AHNForCausalLM models only"):
        perplexity_by_position(base, ids, [160], window=8, progress=False)


def test_ahn_systems(setup):
    _, model, ids, full_logits = setup
    ranges = [(0, 40), (40, 160)]
    # full attention: a window covering the document, whatever the memory holds
    full = perplexity_by_position(model, ids, [40, 160], window=1 << 40, chunk_size=32, logits_chunk=7,
                                  progress=False)
    assert full["ppl"] == pytest.approx(bucket_ppl(full_logits, ids, ranges), rel=1e-5)
    # ahn: chunked through the bounded cache = the one-shot forward of the AHN model
    with torch.no_grad():
        ahn_logits = model(ids).logits
    ahn = perplexity_by_position(model, ids, [40, 160], chunk_size=32, progress=False)
    assert ahn["ppl"] == pytest.approx(bucket_ppl(ahn_logits, ids, ranges), rel=1e-5)
    # swa: the memory's read-out zeroed for the run, restored after
    before = {n: p.clone() for n, p in model.memory_state_dict().items()}
    with memory_disabled(model):
        assert not memory_is_trained(model)
        with torch.no_grad():
            swa_logits = model(ids).logits
        swa = perplexity_by_position(model, ids, [40, 160], chunk_size=32, progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.memory_state_dict().items())
    assert memory_is_trained(model)
    assert swa["ppl"] == pytest.approx(bucket_ppl(swa_logits, ids, ranges), rel=1e-5)
    # the three really differ past the window (so the checks above can fail); they agree inside it
    assert abs(ahn["ppl"][1] - swa["ppl"][1]) > 1e-3 and abs(full["ppl"][1] - swa["ppl"][1]) > 1e-3
    assert swa["ppl"][0] != pytest.approx(full["ppl"][0], rel=1e-9)  # 0..40 already passes the 18-token span


def test_make_systems(setup):
    base, model, _, _ = setup
    systems = {s.name: s for s in make_systems(["full", "swa", "ahn"], model, 16, 2)}
    assert systems["full"].window >= 1 << 40 and not systems["full"].memory
    assert (systems["swa"].window, systems["swa"].memory) == (16, False)
    assert (systems["ahn"].window, systems["ahn"].memory) == (16, True)
    assert [s.name for s in make_systems(["full", "swa"], base)] == ["model"]
    with pytest.raises(ValueError, match="unknown system"):
        make_systems(["dense"], model)


def test_generate_batch_left_padding_matches_single(setup):
    _, model, _, _ = setup
    tok = char_tokenizer()
    prompts = ["The grass is green. The pass key is 123.", "Hello there, a longer prompt about the pass key 9."]
    for window, sinks in ((12, 2), (1 << 40, 0)):
        batched = generate_batch(model, tok, prompts, max_new_tokens=6, window=window, sinks=sinks)
        single = [generate_batch(model, tok, [p], max_new_tokens=6, window=window, sinks=sinks)[0] for p in prompts]
        assert batched == single
        assert all(len(o) > 0 for o in batched)
    # full attention through the AHN model = the base model's own greedy continuation
    base = tiny_llama(VOCAB)
    base_out = generate_batch(base, tok, prompts[:1], max_new_tokens=6)
    fresh = AHNForCausalLM.from_base(copy.deepcopy(base), "gdn", window=8, sinks=2)
    assert generate_batch(fresh, tok, prompts[:1], max_new_tokens=6, window=1 << 40, sinks=0) == base_out
