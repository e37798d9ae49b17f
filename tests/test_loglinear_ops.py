"""Log-linear (Fenwick-tree) ops: naive == recurrent == chunk, collapse to linear, decode, levels."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_inputs, rel_err

from hippolm import ops
from hippolm.ops.loglinear import bit_length, occupied_levels

LOGLINEAR = {"ssd": ops.loglinear_ssd, "gated_delta_rule": ops.loglinear_gated_delta_rule}
STEPS = {"ssd": ops.loglinear_ssd_step, "gated_delta_rule": ops.loglinear_gated_delta_rule_step}


@pytest.fixture(params=list(LOGLINEAR))
def ll_op(request) -> str:
    return request.param


def _inputs(op, B, T, H, K, V, L=None, seed=0):
    x = make_inputs(op, B, T, H, K, V, seed=seed)
    L = L or ops.num_levels(T)
    lam = torch.rand(B, T, H, L, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.25
    return x, lam


def test_levels_are_exact_bit_lengths():
    x = torch.tensor([0, 1, 2, 3, 4, 7, 8, 2**20 - 1, 2**20, 2**40, 2**40 + 1])
    assert bit_length(x).tolist() == [int(v).bit_length() for v in x.tolist()]
    assert [ops.num_levels(t) for t in (1, 2, 3, 4, 5, 8, 9, 2**16, 2**16 + 1)] == [1, 2, 3, 3, 4, 4, 5, 17, 18]


@pytest.mark.parametrize("T,C", [(1, 16), (45, 16), (64, 16), (130, 32), (257, 16)])
def test_chunk_equals_recurrent_equals_naive(ll_op, T, C):
    fn = LOGLINEAR[ll_op]
    (q, k, v, *gates), lam = _inputs(ll_op, 2, T, 2, 8, 6, seed=T)
    o_n, _ = fn(q, k, v, *gates, lam, mode="naive")
    o_r, s_r = fn(q, k, v, *gates, lam, mode="recurrent", output_final_state=True)
    o_c, s_c = fn(q, k, v, *gates, lam, mode="chunk", chunk_size=C, output_final_state=True)
    assert rel_err(o_r, o_n) < 1e-10 and rel_err(o_c, o_n) < 1e-10
    assert rel_err(s_c.slots, s_r.slots) < 1e-10
    assert s_c.position.tolist() == s_r.position.tolist() == [T, T]


def test_levels_matter(ll_op):
    """Changing the weight of one level changes exactly the outputs that see that level."""
    fn = LOGLINEAR[ll_op]
    (q, k, v, *gates), lam = _inputs(ll_op, 1, 40, 1, 4, 4)
    lam2 = lam.clone()
    lam2[..., 3] += 1.0  # level 3: keys 4..7 positions back, only for queries with bit 2 set
    o1, _ = fn(q, k, v, *gates, lam, chunk_size=16)
    o2, _ = fn(q, k, v, *gates, lam2, chunk_size=16)
    changed = ((o1 - o2).abs().amax((0, 2, 3)) > 1e-12).tolist()
    assert changed == [bool((t >> 2) & 1) for t in range(40)]


def test_collapse_to_linear(ll_op):
    """Equal lam across levels reproduces the linear op scaled by that value."""
    fn, linear = LOGLINEAR[ll_op], getattr(ops, f"{ll_op}_recurrent")
    (q, k, v, *gates), lam = _inputs(ll_op, 2, 100, 2, 8, 8)
    lam = lam[..., :1].expand_as(lam).contiguous()
    o_ll, _ = fn(q, k, v, *gates, lam, chunk_size=16)
    o_lin, _ = linear(q, k, v, *gates)
    assert rel_err(o_ll, o_lin * lam[..., :1]) < 1e-10


def test_packed_sequences_with_different_lengths_and_positions(ll_op):
    fn = LOGLINEAR[ll_op]
    lengths, starts = [50, 1, 0, 33], [0, 17, 5, 64]
    T, H, K, V = sum(lengths), 2, 8, 4
    L = ops.num_levels(64 + 33)
    (q, k, v, *gates), lam = _inputs(ll_op, 1, T, H, K, V, L=L, seed=4)
    gen = torch.Generator().manual_seed(9)
    init = ops.LogLinearState(torch.randn(4, H, L, K, V, generator=gen, dtype=torch.float64),
                              torch.tensor(starts))
    # Slots a real prefix could not have filled stay zero (positions decide occupancy).
    init.slots.mul_(occupied_levels(init.position, L)[:, None, :, None, None])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    o_c, s_c = fn(q, k, v, *gates, lam, cu_seqlens=cu, initial_state=init, output_final_state=True, chunk_size=16)
    o_r, s_r = fn(q, k, v, *gates, lam, cu_seqlens=cu, initial_state=init, output_final_state=True,
                  mode="recurrent")
    o_n, _ = fn(q, k, v, *gates, lam, cu_seqlens=cu, initial_state=init, mode="naive")
    assert rel_err(o_c, o_n) < 1e-10 and rel_err(o_r, o_n) < 1e-10
    assert rel_err(s_c.slots, s_r.slots) < 1e-10
    assert s_c.position.tolist() == [s + n for s, n in zip(starts, lengths, strict=True)]
    # ... and every op leaves them zero: the fused decode step reads only the occupied ones.
    empty = ~occupied_levels(s_c.position, L)
    assert empty.any() and all((s.slots.transpose(1, 2)[empty] == 0).all() for s in (s_c, s_r))
    # Each packed sequence alone gives the same.
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        if b == a:
            continue
        one = ops.LogLinearState(init.slots[n : n + 1], init.position[n : n + 1])
        o_1, _ = fn(q[:, a:b], k[:, a:b], v[:, a:b], *(x[:, a:b] for x in gates), lam[:, a:b], initial_state=one,
                    chunk_size=16)
        assert rel_err(o_c[:, a:b], o_1) < 1e-10


def test_prefill_then_decode_equals_one_forward(ll_op):
    """The bug class FLA shipped: continue decoding after a prefill."""
    fn, step = LOGLINEAR[ll_op], STEPS[ll_op]
    B, T, H, K, V = 2, 150, 2, 8, 8
    (q, k, v, *gates), lam = _inputs(ll_op, B, T, H, K, V, seed=3)
    o_full, s_full = fn(q, k, v, *gates, lam, output_final_state=True, chunk_size=32)
    for cut in (1, 64, 97):
        o_pre, state = fn(*(x[:, :cut] for x in (q, k, v, *gates, lam)), output_final_state=True, chunk_size=32)
        outs = [o_pre]
        for t in range(cut, T):
            o, state = step(*(x[:, t] for x in (q, k, v, *gates, lam)), state)
            outs.append(o[:, None])
        assert rel_err(torch.cat(outs, 1), o_full) < 1e-10
        assert rel_err(state.slots, s_full.slots) < 1e-10


def test_split_prefill_equals_one_pass(ll_op):
    fn = LOGLINEAR[ll_op]
    (q, k, v, *gates), lam = _inputs(ll_op, 2, 300, 2, 8, 8, seed=5)
    o_full, s_full = fn(q, k, v, *gates, lam, output_final_state=True, chunk_size=32)
    cuts = sorted(random.Random(1).sample(range(1, 300), 4))
    state, outs = None, []
    for a, b in zip([0, *cuts], [*cuts, 300], strict=True):
        o, state = fn(*(x[:, a:b] for x in (q, k, v, *gates, lam)), initial_state=state, output_final_state=True,
                      chunk_size=32)
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), o_full) < 1e-10 and rel_err(state.slots, s_full.slots) < 1e-10


def test_batch_decode_with_different_positions(ll_op):
    """One batched step over sequences at different positions == each sequence on its own."""
    step = STEPS[ll_op]
    L, H, K, V = 6, 2, 4, 4
    (q, k, v, *gates), lam = _inputs(ll_op, 3, 1, H, K, V, L=L)
    gen = torch.Generator().manual_seed(2)
    state = ops.LogLinearState(torch.randn(3, H, L, K, V, generator=gen, dtype=torch.float64),
                               torch.tensor([0, 7, 31]))
    o, new = step(*(x[:, 0] for x in (q, k, v, *gates, lam)), state)
    for n in range(3):
        one = ops.LogLinearState(state.slots[n : n + 1], state.position[n : n + 1])
        o_n, new_n = step(*(x[n : n + 1, 0] for x in (q, k, v, *gates, lam)), one)
        assert rel_err(o[n : n + 1], o_n) < 1e-12 and rel_err(new.slots[n : n + 1], new_n.slots) < 1e-12
    assert new.position.tolist() == [1, 8, 32]


@pytest.mark.parametrize("k_exp", [3, 6, 9])
def test_decode_state_has_log_many_levels(ll_op, k_exp):
    """At T = 2^k the decode state holds k + 1 level slots, and exactly popcount(T-1) + 1 are in use."""
    T = 2**k_exp
    (q, k, v, *gates), lam = _inputs(ll_op, 1, T, 1, 2, 2, seed=k_exp)
    _, state = LOGLINEAR[ll_op](q, k, v, *gates, lam, output_final_state=True, chunk_size=8)
    assert state.num_levels == k_exp + 1
    used = int((state.slots.abs().amax((0, 1, 3, 4)) > 0).sum())
    assert used == bin(T - 1).count("1") + 1


def test_gradients_of_chunk_equal_autograd_of_naive(ll_op):
    fn = LOGLINEAR[ll_op]
    (q, k, v, *gates), lam = _inputs(ll_op, 2, 70, 2, 4, 4, seed=6)
    grads = {}
    for mode in ("naive", "chunk"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, *gates, lam)]
        o, _ = fn(*leaves, mode=mode, chunk_size=16)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(0), dtype=o.dtype)
        grads[mode] = torch.autograd.grad((o * w).sum(), leaves)
    for a, b in zip(grads["chunk"], grads["naive"], strict=True):
        assert rel_err(a, b) < 1e-10


def test_gradients_of_a_continuation_equal_autograd_of_naive(ll_op):
    """Chunk form continuing from slots at positions > 0 (mid-chunk, aligned, far): gradients of every
    input and of the slots == autograd of the naive form."""
    fn = LOGLINEAR[ll_op]
    starts = [37, 64, 1000]
    (q, k, v, *gates), lam = _inputs(ll_op, 3, 40, 2, 4, 4, L=ops.num_levels(1040), seed=7)
    slots = torch.randn(3, 2, lam.shape[-1], 4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for n, p in enumerate(starts):  # slots a real prefix could not have filled stay zero
        for lv in range(lam.shape[-1]):
            if not (lv == 0 or ((p - 1) >> (lv - 1)) & 1):
                slots[n, :, lv] = 0
    grads = {}
    for mode in ("naive", "chunk"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, *gates, lam, slots)]
        state = ops.LogLinearState(leaves[-1], torch.tensor(starts))
        o, _ = fn(*leaves[:-1], initial_state=state, mode=mode, chunk_size=16)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(0), dtype=o.dtype)
        grads[mode] = torch.autograd.grad((o * w).sum(), leaves)
    for a, b in zip(grads["chunk"], grads["naive"], strict=True):
        assert rel_err(a, b) < 1e-10


def test_too_long_sequence_is_an_error(ll_op):
    fn, step = LOGLINEAR[ll_op], STEPS[ll_op]
    (q, k, v, *gates), lam = _inputs(ll_op, 1, 20, 1, 4, 4, L=5)  # 5 levels cover 16 tokens
    for mode in ("chunk", "recurrent", "naive"):
        with pytest.raises(ValueError, match="needs 6 levels but lam has 5"):
            fn(q, k, v, *gates, lam, mode=mode)
    _, state = fn(*(x[:, :16] for x in (q, k, v, *gates, lam)), output_final_state=True)
    with pytest.raises(ValueError, match="beyond the 16 tokens"):
        step(*(x[:, 16] for x in (q, k, v, *gates, lam)), state)


def test_bad_lam_and_state(ll_op):
    fn = LOGLINEAR[ll_op]
    (q, k, v, *gates), lam = _inputs(ll_op, 1, 8, 1, 4, 4)
    with pytest.raises(ValueError, match="lam must have shape"):
        fn(q, k, v, *gates, lam[:, :, :, None])
    with pytest.raises(ValueError, match="lam contains NaN"):
        fn(q, k, v, *gates, lam * float("nan"))
    with pytest.raises(ValueError, match="initial_state must be a LogLinearState"):
        fn(q, k, v, *gates, lam, initial_state=torch.zeros(1, 1, 4, 4))
    elsewhere = ops.LogLinearState(torch.zeros(1, 1, lam.shape[-1], 4, 4, device="meta"),
                                   torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"initial_state\.slots must be on cpu"):
        fn(q, k, v, *gates, lam, initial_state=elsewhere)
    with pytest.raises(ValueError, match="mode must be"):
        fn(q, k, v, *gates, lam, mode="fast")
    with pytest.raises(ValueError, match="power of two"):
        fn(q, k, v, *gates, lam, chunk_size=48)
