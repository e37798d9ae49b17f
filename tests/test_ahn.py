"""AHN conversion, bounded cache and generation on tiny random models of each family (CPU)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hippolm import AHNForCausalLM
from hippolm.ahn import MEMORY_TYPES

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=16)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL)),
}


def tiny_base(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def with_random_memory(model: AHNForCausalLM, seed: int = 1) -> AHNForCausalLM:
    """Give the zero-initialised read-out random weights so the memory changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.memory_state_dict().items():
            if name.endswith("ahn.o_proj") or "lam_proj" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def ahn(family="llama", memory="gdn", window=8, sinks=2, seed=0):
    return with_random_memory(AHNForCausalLM.from_base(tiny_base(family, seed), memory, window=window, sinks=sinks))


def swa_oracle_logits(base, ids, window, sinks):
    """The base model with an explicit sinks + sliding-window mask (no memory)."""
    T = ids.shape[1]
    t = torch.arange(T)
    allowed = (t[None, :] <= t[:, None]) & ((t[None, :] < sinks) | (t[:, None] - t[None, :] < window))
    mask = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))[None, None]
    return base(ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_zero_memory_equals_swa_and_large_window_equals_base(family):
    base = tiny_base(family)
    ids = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        base_logits = base(ids).logits
        swa = swa_oracle_logits(base, ids, window=8, sinks=3)
        model = AHNForCausalLM.from_base(copy.deepcopy(base), "gdn", window=8, sinks=3)
        assert torch.allclose(model(ids).logits, swa, atol=1e-5)
        assert torch.allclose(model(ids, window=64).logits, base_logits, atol=1e-5)
        # The oracle really differs from the base: the test can fail.
        assert (swa - base_logits).abs().max() > 1e-3


@pytest.mark.parametrize("memory", MEMORY_TYPES)
def test_one_call_equals_chunks_equals_token_by_token(memory):
    model = ahn("llama", memory, window=8, sinks=2)
    ids = torch.randint(0, 97, (2, 45))
    with torch.no_grad():
        full = model(ids).logits
        assert (full - model(ids, window=64).logits).abs().max() > 1e-3  # the memory matters
        cache = model.new_cache()
        steps = torch.cat([model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(45)], 1)
        cuts = sorted(random.Random(memory).sample(range(1, 45), 4))
        cache = model.new_cache()
        chunks = torch.cat([model(ids[:, a:b], past_key_values=cache).logits
                            for a, b in zip([0, *cuts], [*cuts, 45], strict=True)], 1)
    assert torch.allclose(steps, full, atol=1e-5)
    assert torch.allclose(chunks, full, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_families_decode_equals_full(family):
    model = ahn(family, "gdn", window=6, sinks=1)
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        pre = model(ids[:, :17], past_key_values=cache).logits
        # the cache's name from transformers 5.25 on works as the older past_key_values
        rest = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(17, 30)], 1)
        with pytest.raises(ValueError, match="two different caches"):
            model(ids[:, :1], cache=cache, past_key_values=model.new_cache())
    assert torch.allclose(torch.cat([pre, rest], 1), full, atol=1e-5)


@pytest.mark.parametrize("memory", ["gdn", "loglinear_mamba2"])
def test_cache_bytes_flat_past_the_window(memory):
    model = ahn("llama", memory, window=16, sinks=2)
    sizes = {}
    with torch.no_grad():
        for mult in (1, 4, 16):
            cache = model.new_cache()
            model.prefill(torch.randint(0, 97, (1, 16 * mult)), cache=cache, chunk_size=32)
            sizes[mult] = cache.nbytes()
    assert sizes[1] == sizes[4] == sizes[16] > 0


def left_padded(lengths: list[int]):
    """Random sequences of these lengths, left-padded into one batch: (seqs, ids, mask, positions)."""
    seqs = [torch.randint(0, 97, (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(T - len(s), dtype=torch.long), s]) for s in seqs])
    mask = torch.stack([torch.cat([torch.zeros(T - len(s)), torch.ones(len(s))]) for s in seqs]).long()
    return seqs, ids, mask, (mask.cumsum(1) - 1).clamp_min(0)


@pytest.mark.parametrize("memory", ["gdn", "deltanet", "loglinear_gdn"])
def test_left_padded_batch_equals_each_sequence_alone(memory):
    model = ahn("llama", memory, window=6, sinks=2)
    lengths = [30, 17, 9]
    seqs, ids, mask, positions = left_padded(lengths)
    T = ids.shape[1]
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
        cache = model.new_cache()  # the same through a cache, in two chunks
        part = model(ids[:, :12], attention_mask=mask[:, :12], position_ids=positions[:, :12],
                     past_key_values=cache).logits
        part2 = model(ids[:, 12:], attention_mask=mask, position_ids=positions[:, 12:], past_key_values=cache).logits
        for b, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            assert torch.allclose(batch[b, T - len(s) :], alone, atol=1e-5)
            assert torch.allclose(torch.cat([part, part2], 1)[b, T - len(s) :], alone, atol=1e-5)


@pytest.mark.parametrize("memory", ["gdn", "loglinear_mamba2"])
def test_left_padded_batch_token_by_token_equals_each_sequence_alone(memory):
    """Decode from an empty cache one token at a time, rows left-padded by different amounts: each
    row fills its sinks, window and memory at its own step (the sync-free decode writes)."""
    model = ahn("llama", memory, window=5, sinks=3)
    lengths = [26, 14, 4]
    seqs, ids, mask, positions = left_padded(lengths)
    T = ids.shape[1]
    with torch.no_grad():
        cache = model.new_cache()
        steps = torch.cat([model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                                 position_ids=positions[:, t : t + 1], past_key_values=cache).logits
                           for t in range(T)], 1)
        for b, s in enumerate(seqs):
            assert torch.allclose(steps[b, T - len(s) :], model(s[None]).logits[0], atol=1e-5)


@pytest.mark.parametrize("memory", ["gdn", "loglinear_gdn"])
def test_decode_before_the_window_fills_needs_no_device_sync(memory, monkeypatch):
    """A decode step while sinks and window are still filling reads no tensor value on the host
    (each read is a device sync per layer per token on a GPU)."""
    model = ahn("llama", memory, window=5, sinks=3)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :2], past_key_values=cache)
        reads = []
        for name in ("__bool__", "item", "tolist"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name,
                                lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
        for t in range(2, 7):  # stream length stays below sinks + window = 8
            model(ids[:, t : t + 1], past_key_values=cache)
    assert reads == []


@pytest.mark.parametrize("memory", ["gdn", "loglinear_mamba2"])
def test_decode_runs_the_memory_only_once_real_tokens_can_leave(memory, monkeypatch):
    """Until the stream passes sinks + window tokens every token leaving the window is a sink (or
    padding), so a decode step skips the memory (empty, it reads zero); from then on each layer
    steps it once per token, and token-by-token decoding still equals one full forward."""
    from hippolm.ahn.memory import MemoryModule

    model = ahn("llama", memory, window=5, sinks=3)
    ids = torch.randint(0, 97, (2, 14))
    calls = []
    original = MemoryModule.decode_step
    monkeypatch.setattr(MemoryModule, "decode_step", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps, per_step = [model(ids[:, :2], past_key_values=cache).logits], []
        for t in range(2, 14):
            calls.clear()
            steps.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
            per_step.append(len(calls))
    assert per_step == [0] * 6 + [2] * 6  # stream lengths 2..7 skip it, 8..13 step both layers
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("memory", ["gdn", "loglinear_mamba2"])
def test_decode_before_the_window_fills_reads_positions_from_the_device(memory):
    """A decode step before the window fills takes its slots from the cache's device cursor, not
    the host stream length (which a replayed CUDA graph does not advance): with the host counter
    held wrong at every step, token-by-token decoding still equals one full forward."""
    model = ahn("llama", memory, window=5, sinks=3)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :1], past_key_values=cache).logits]

        def buffers():  # the memory state is updated in place (a captured step writes one buffer)
            return [getattr(layer.memory, "slots", layer.memory).data_ptr() for layer in cache.layers]

        before = buffers()
        for t in range(1, 7):  # stream length stays below sinks + window = 8
            for layer in cache.layers:
                layer.stream_len = 1  # wrong (the true length is t) but still "has a past"
            pos = torch.full((2, 1), t)  # as GraphDecoder passes them (transformers would ask the cache)
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, position_ids=pos,
                               cache_position=pos[0]).logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert buffers() == before


def test_generate_greedy_batch_and_sampling():
    model = ahn("llama", "gdn", window=6, sinks=2)
    seqs = [torch.randint(1, 97, (n,)) for n in (21, 11)]
    T = 21
    ids = torch.stack([torch.cat([torch.zeros(T - len(s), dtype=torch.long), s]) for s in seqs])
    mask = (torch.arange(T)[None] >= torch.tensor([T - len(s) for s in seqs])[:, None]).long()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         prefill_chunk_size=5)
    for b, s in enumerate(seqs):
        alone = model.generate(s[None], max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert out[b, T:].tolist() == alone[0, len(s) :].tolist()
        # Greedy decoding by hand: argmax of repeated full forwards (no cache at all).
        cur = s[None]
        for _ in range(8):
            cur = torch.cat([cur, model(cur).logits[:, -1:].argmax(-1)], 1)
        assert cur[0, len(s) :].tolist() == alone[0, len(s) :].tolist()
    torch.manual_seed(0)
    sampled = model.generate(seqs[0][None], max_new_tokens=5, do_sample=True, top_k=20, pad_token_id=0)
    assert sampled.shape == (1, 26)


@pytest.mark.parametrize("settings", [dict(do_sample=False, pad_token_id=0, eos_token_id=[4, 96]),
                                      dict(do_sample=False, repetition_penalty=1.3, pad_token_id=0),
                                      dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, pad_token_id=0),
                                      dict(do_sample=True, pad_token_id=0)])
def test_graph_generate_loop_equals_transformers_generate(settings):
    """The decoding loop of generate(cuda_graph=True), run with eager steps (capture=False: the steps
    its CUDA graphs replay, as test_ahn_cuda checks) == transformers' generate: a left-padded batch
    with window and memory in use; greedy with two eos ids (finished rows padded, as transformers
    does), repetition penalty, and sampling with temperature, top-k and top-p under one seed, or with
    none of them given (transformers' defaults then: top-k 50 over the whole vocabulary of 97)."""
    from hippolm.ahn.graph import graph_generate

    model = ahn("llama", "gdn", window=6, sinks=2)
    T = 21
    seqs = [torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (21, 11)]
    ids = torch.stack([torch.cat([torch.zeros(T - len(s), dtype=torch.long), s]) for s in seqs])
    mask = (torch.arange(T)[None] >= torch.tensor([T - len(s) for s in seqs])[:, None]).long()
    torch.manual_seed(1)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, **settings)
    cache = model.new_cache()
    model.prefill(ids[:, :-1], mask[:, :-1], cache)
    torch.manual_seed(1)
    got = graph_generate(model, ids, cache, capture=False, max_new_tokens=12, **settings)
    assert got.tolist() == want.tolist()
    if "eos_token_id" in settings:  # the case says something only if a row finishes early
        assert (got[:, T:] == 0).any()


def test_graph_generate_from_one_token_and_an_empty_cache():
    """Nothing to prefill: the first step runs eagerly, then the decoder takes over."""
    from hippolm.ahn.graph import graph_generate

    model = ahn("llama", "gdn", window=6, sinks=2)
    ids = torch.tensor([[7]])
    want = model.generate(ids, max_new_tokens=15, do_sample=False, pad_token_id=0)
    got = graph_generate(model, ids, model.new_cache(), capture=False, max_new_tokens=15, do_sample=False,
                         pad_token_id=0)
    assert got.tolist() == want.tolist()


def test_graph_generate_refuses_what_it_does_not_do():
    from hippolm.ahn.graph import graph_generate

    model = ahn("llama", "gdn", window=6, sinks=2)
    ids = torch.randint(1, 97, (1, 9))
    cache = model.new_cache()
    model.prefill(ids[:, :-1], None, cache)
    with pytest.raises(ValueError, match="num_beams"):
        graph_generate(model, ids, cache, capture=False, num_beams=2)
    with pytest.raises(ValueError, match="output_scores"):
        graph_generate(model, ids, cache, capture=False, output_scores=True)
    with pytest.raises(ValueError, match="CUDA device"):
        model.generate(ids, max_new_tokens=2, cuda_graph=True)


@pytest.mark.parametrize("settings", [dict(num_beams=3, do_sample=False), dict(num_return_sequences=2, do_sample=True)])
def test_beam_search_and_several_sequences_per_prompt(settings):
    """transformers repeats each input row for beams / returned sequences; the cache generate
    prefilled is repeated the same way: the same tokens as the converted model run without any cache
    (every step a full forward under the sinks + window mask; a new memory reads zero)."""
    model = AHNForCausalLM.from_base(tiny_base("llama"), "gdn", window=6, sinks=2)
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    got = model.generate(ids, max_new_tokens=6, pad_token_id=0, **settings)
    torch.manual_seed(5)
    want = model.base.generate(ids, max_new_tokens=6, pad_token_id=0, use_cache=False, **settings)
    assert got.shape == (2 * settings.get("num_return_sequences", 1), 16)
    assert got.tolist() == want.tolist()


def test_generate_refuses_a_cache_holding_the_whole_prompt():
    model = ahn("llama", "gdn", window=6, sinks=2)
    ids = torch.randint(1, 97, (1, 15))
    cache = model.prefill(ids)
    with pytest.raises(ValueError, match="already holds 15 tokens"):
        model.generate(ids, cache=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="empty"):
        model.generate(ids[:, :0], max_new_tokens=3)
    # a cache of all but the last token continues as one call would
    cache = model.prefill(ids[:, :-1])
    got = model.generate(ids, cache=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert got.tolist() == model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_dtype_change_after_a_forward_rebuilds_the_fused_projection(dtype):
    """Module.to() swaps each parameter's data without bumping its version: the kept concatenation
    of the k/v and gate projections must follow (else a float32 weight meets float64 inputs)."""
    model = ahn("llama", "gdn", window=6, sinks=2)
    ids = torch.randint(1, 97, (1, 12))
    fresh = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        model(ids)  # keeps the float32 concatenation
        model.to(dtype)
        got, want = model(ids).logits, fresh(ids).logits
    assert got.dtype == dtype and torch.equal(got, want)


def test_multi_turn_continuation_reuses_the_cache():
    model = ahn("llama", "gdn", window=6, sinks=2)
    turn1 = torch.randint(1, 97, (1, 19))
    cache = model.new_cache()
    out1 = model.generate(turn1, past_key_values=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
    turn2 = torch.cat([out1, torch.randint(1, 97, (1, 7))], 1)
    out2 = model.generate(turn2, past_key_values=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
    fresh = model.generate(turn2, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out2.tolist() == fresh.tolist()


def test_prefill_chunks_are_cut_to_the_window(monkeypatch):
    """A chunk attends to itself and the window: chunks longer than the window (at least 512) are
    cut to it (any chunking gives the same logits: test_one_call_equals_chunks_equals_token_by_token)."""
    model = ahn("llama", "gdn", window=600, sinks=2)
    seen = []
    decoder = model.base.get_decoder()
    monkeypatch.setattr(decoder, "forward", lambda *a, f=decoder.forward, **kw: seen.append(kw["input_ids"].shape[1])
                        or f(*a, **kw))
    ids = torch.randint(1, 97, (1, 1500))
    cache = model.prefill(ids, chunk_size=4096)
    assert seen == [600, 600, 300]
    assert cache.get_seq_length() == 1500


def test_prefill_computes_no_logits_and_generate_keeps_only_last(monkeypatch):
    model = ahn("llama", "gdn", window=6, sinks=2)
    shapes = []
    head = model.base.lm_head
    monkeypatch.setattr(head, "forward", lambda x, f=head.forward: shapes.append(tuple(x.shape)) or f(x))
    model.generate(torch.randint(1, 97, (1, 40)), max_new_tokens=3, do_sample=False, pad_token_id=0,
                   prefill_chunk_size=8)
    assert all(s[1] == 1 for s in shapes) and len(shapes) == 3


def test_save_and_load_memory_round_trip(tmp_path):
    model = ahn("llama", "loglinear_gdn", window=6, sinks=2)
    model.save_memory(tmp_path / "mem")
    ids = torch.randint(0, 97, (1, 30))
    loaded = AHNForCausalLM.from_base(tiny_base("llama"), tmp_path / "mem")
    assert (loaded.ahn_config.memory, loaded.ahn_config.window, loaded.ahn_config.sinks) == ("loglinear_gdn", 6, 2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    with pytest.raises(ValueError, match="does not match this base"):
        AHNForCausalLM.from_base(tiny_base("qwen3"), tmp_path / "mem")
    other = AHNForCausalLM.from_base(tiny_base("llama"), "mamba2")
    with pytest.raises(ValueError, match="does not hold this model's memory"):
        other.load_memory(tmp_path / "mem" / "memory.safetensors")
    with pytest.raises(ValueError, match="memory must be one of"):
        AHNForCausalLM.from_base(tiny_base("llama"), tmp_path / "nothing-here")


def test_only_memory_trains():
    model = AHNForCausalLM.from_base(tiny_base("llama"), "gdn", window=4, sinks=1)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable and trainable == {id(p) for p in model.parameters() if p.requires_grad}
    ids = torch.randint(0, 97, (2, 20))
    model(ids).logits.sum().backward()
    assert all(p.grad is None for p in model.parameters() if id(p) not in trainable)
    # The zero-initialised read-out gets a gradient, so training can start from plain SWA.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # k/v with and without bias
def test_kv_and_gate_projections_in_one_matmul_equal_the_separate_layers(family):
    attn = ahn(family, "loglinear_gdn").base.model.layers[0].self_attn
    mem, layers = attn.ahn, (attn.k_proj, attn.v_proj)
    x = torch.randn(2, 5, SMALL["hidden_size"])

    def separate():
        return [layer(x) for layer in layers], {n: layer(x) for n, layer in mem._gate_layers()}

    def check(got, want):
        for a, b in zip([*got[0], *got[1].values()], [*want[0], *want[1].values()], strict=True):
            # float32 sums in another order (one matmul vs several): ulps of the largest entry; a
            # stale concatenation is off by O(1)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()))
        assert list(got[1]) == list(want[1])

    with torch.no_grad():
        check(mem.projections(x, layers), separate())
        mem.b_proj.weight.add_(1.0)  # an optimizer step: the kept concatenation must follow
        (attn.k_proj.weight if attn.k_proj.bias is None else attn.k_proj.bias).add_(1.0)
        check(mem.projections(x, layers), separate())
        # parameters replaced by new ones (weights loaded by assignment) are not the kept ones, even
        # at the same address with the same version count (twice: the second time both are 0)
        for _ in range(2):
            for _, layer in mem._gate_layers():
                fresh = torch.nn.Parameter(layer.weight.data)
                fresh.data.copy_(torch.randn_like(fresh))  # unseen by version counters
                layer.weight = fresh
            check(mem.projections(x, layers), separate())
    # training: gradients reach the gate weights as through the separate layers
    grads = []
    for run in (lambda: mem.projections(x, layers), separate):
        mem.zero_grad()
        raw = run()[1]
        sum((r * torch.arange(r.shape[-1])).sum() for r in raw.values()).backward()
        grads.append([layer.weight.grad.clone() for _, layer in mem._gate_layers()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a projection with a hook (adapters, offloading) runs as itself
    attn.k_proj.register_forward_hook(lambda module, args, out: 2 * out)
    with torch.no_grad():
        check(mem.projections(x, layers), separate())


def test_bad_input_is_a_clear_error():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="not supported"):
        AHNForCausalLM.from_base(gpt2, "gdn")
    with pytest.raises(ValueError, match="memory must be one of"):
        AHNForCausalLM.from_base(tiny_base(), "lstm")
    model = AHNForCausalLM.from_base(tiny_base(), "gdn", window=4, sinks=1)
    with pytest.raises(ValueError, match="window must be a positive int"):
        model(torch.randint(0, 97, (1, 5)), window=0)
    cache = model.new_cache()
    model(torch.randint(0, 97, (1, 5)), past_key_values=cache)
    with pytest.raises(ValueError, match="this cache was made for window=4"):
        model(torch.randint(0, 97, (1, 1)), past_key_values=cache, window=8)
    model(torch.randint(0, 97, (1, 1)), past_key_values=cache, sinks=1)  # the cache's own sinks: fine
    wide = model.new_cache(window=12)
    model(torch.randint(0, 97, (1, 3)), past_key_values=wide, sinks=1)  # sinks given, window the cache's
    with pytest.raises(ValueError, match="got sinks=3"):
        model(torch.randint(0, 97, (1, 1)), past_key_values=wide, sinks=3)
    with pytest.raises(ValueError, match="window must be a positive int"):
        model.new_cache(window=0)
    with pytest.raises(ValueError, match="window must be a positive int"):
        AHNForCausalLM.from_base(tiny_base(), "gdn", window=0)
    with pytest.raises(ValueError, match="levels must be an int >= 2"):
        AHNForCausalLM.from_base(tiny_base(), "loglinear_gdn", levels=0)
    with pytest.raises(ValueError, match="already has an AHN memory"):
        AHNForCausalLM.from_base(model.base, "gdn")
    with pytest.raises(ValueError, match="input_ids is empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="left padding only"):
        model(torch.randint(0, 97, (1, 12)), attention_mask=torch.tensor([[1] * 6 + [0] + [1] * 5]))


def test_graph_decoder_refuses_cpu_and_short_cache():
    model = ahn("llama", "gdn", window=4, sinks=1)
    cache = model.new_cache()
    with torch.no_grad():
        model.prefill(torch.randint(0, 97, (1, 3)), cache=cache)
    with pytest.raises(ValueError, match="CUDA"):
        model.graph_decoder(cache)


def test_steady_decode_keeps_cache_buffers_in_place():
    """Past the window a decode step writes into the same tensors (what a CUDA graph replays)."""
    model = ahn("llama", "gdn", window=4, sinks=1)
    cache = model.new_cache()
    with torch.no_grad():
        model.prefill(torch.randint(0, 97, (2, 9)), cache=cache)
        layer = cache.layers[0]
        ptrs = [t.data_ptr() for t in layer.tensors()]
        model(torch.randint(0, 97, (2, 1)), past_key_values=cache)
    assert layer.all_visible and [t.data_ptr() for t in layer.tensors()] == ptrs
    assert layer.cursor.tolist() == [layer.stream_len] * 2 == [10, 10]


def test_loglinear_memory_past_its_levels_is_a_clear_error():
    model = AHNForCausalLM.from_base(tiny_base(), "loglinear_gdn", window=4, sinks=1, levels=3)  # 4 tokens past
    cache = model.new_cache()
    with torch.no_grad():
        model.prefill(torch.randint(0, 97, (1, 9)), cache=cache)  # 4 written: the last that fits
        with pytest.raises(ValueError, match="levels"):
            model(torch.randint(0, 97, (1, 1)), past_key_values=cache)

