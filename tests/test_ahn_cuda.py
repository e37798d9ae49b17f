"""AHN decoding on CUDA: eager vs the CUDA-graph decoder vs one full forward. Skipped without a
GPU; run on the lent GPU through benchmarks/ahn_gpu.sh."""

from __future__ import annotations

import copy

import pytest
import torch
from test_ahn import ahn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("memory,prompt", [("gdn", 16), ("mamba2", 16), ("loglinear_gdn", 16), ("gdn", 3),
                                           ("loglinear_mamba2", 3)])
def test_graph_decoder_equals_eager_decode_and_full_forward(memory, prompt):
    """From a prompt past the window (16) or shorter than sinks + window (3: the window-filling graph,
    the eager steps at the boundary, then the window-full graph)."""
    model = ahn("llama", memory, window=8, sinks=2).cuda()
    ids = torch.randint(0, 97, (3, 40), device="cuda")
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        model.prefill(ids[:, :prompt], cache=cache)
        eager_cache = copy.deepcopy(cache)
        eager = torch.cat([model(ids[:, t : t + 1], past_key_values=eager_cache).logits
                           for t in range(prompt, 40)], 1)
        decoder = model.graph_decoder(cache)
        graphed = torch.cat([decoder(ids[:, t : t + 1]).clone() for t in range(prompt, 40)], 1)
    assert decoder.graph is not None  # it really replayed a graph
    assert ("filling" in decoder.graphs) == (prompt < 10 - 3)  # 10 = sinks + window; warm-up and capture first
    assert torch.allclose(eager, full[:, prompt:], atol=1e-4)
    assert torch.allclose(graphed, eager, atol=1e-5)
    assert cache.get_seq_length() == eager_cache.get_seq_length() == 40
    for a, b in zip(cache.layers, eager_cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.real_seen, b.real_seen)


@pytest.mark.parametrize("prompt", [3, 21])
def test_generate_with_cuda_graphs_equals_transformers_generate(prompt):
    """generate(cuda_graph=True) == generate() greedily, left-padded batch, from a prompt that
    leaves the window filling (3: both graphs and the eager boundary steps) or past it (21)."""
    model = ahn("llama", "gdn", window=8, sinks=2).cuda()
    ids = torch.randint(1, 97, (2, prompt), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, : prompt // 2] = 0
    ids = ids * mask
    want = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                         cuda_graph=True)
    assert got.tolist() == want.tolist()


def test_bf16_decode_matches_full_forward():
    model = ahn("qwen2", "gdn", window=16, sinks=4).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 64), device="cuda")
    with torch.no_grad():
        full = model(ids).logits.float()
        cache = model.new_cache()
        pre = model(ids[:, :40], past_key_values=cache).logits.float()
        rest = torch.cat([model(ids[:, t : t + 1], past_key_values=cache).logits.float() for t in range(40, 64)], 1)
    got = torch.cat([pre, rest], 1)
    assert (got - full).norm() / full.norm() < 2e-2


def test_training_forward_under_bf16_autocast():
    """distill runs the student under CUDA autocast, where normalize returns float32 and v stays bf16."""
    model = ahn("llama", "gdn", window=4, sinks=1).cuda()
    for p in model.trainable_parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, 97, (2, 40), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.trainable_parameters())
