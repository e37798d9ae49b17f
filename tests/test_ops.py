"""The three forms of each recurrence compute one function (float64 oracle checks)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import OP_GATES, make_inputs, rel_err

from hippolm import ops

SHAPES = [  # B, T, H, K, V, chunk
    (1, 1, 1, 4, 4, 16),
    (2, 37, 3, 8, 5, 16),
    (3, 64, 2, 16, 16, 16),
    (1, 129, 4, 8, 12, 32),
    (2, 100, 2, 32, 8, 64),
]


def _forms(op_name):
    return (getattr(ops, f"{op_name}_recurrent"), getattr(ops, f"{op_name}_chunk"),
            getattr(ops, f"{op_name}_step"))


def _run_steps(step, q, k, v, gates, state):
    outs = []
    for t in range(q.shape[1]):
        o, state = step(q[:, t], k[:, t], v[:, t], *(x[:, t] for x in gates), state)
        outs.append(o)
    return torch.stack(outs, dim=1), state


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}K{}V{}C{}".format(*s))
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_equals_recurrent_equals_steps(op_name, shape, with_state):
    B, T, H, K, V, C = shape
    recurrent, chunk, step = _forms(op_name)
    q, k, v, *gates = make_inputs(op_name, B, T, H, K, V, seed=hash(shape) % 1000)
    S0 = torch.randn(B, H, K, V, dtype=torch.float64) if with_state else None
    o_r, s_r = recurrent(q, k, v, *gates, initial_state=S0, output_final_state=True)
    o_c, s_c = chunk(q, k, v, *gates, initial_state=S0, output_final_state=True, chunk_size=C)
    o_s, s_s = _run_steps(step, q, k, v, gates, S0)
    assert rel_err(o_c, o_r) < 1e-10 and rel_err(s_c, s_r) < 1e-10
    assert rel_err(o_s, o_r) < 1e-10 and rel_err(s_s, s_r) < 1e-10
    # The recurrence is not trivial: the state matters for the output.
    if with_state:
        o_zero, _ = chunk(q, k, v, *gates, chunk_size=C)
        assert rel_err(o_zero, o_c) > 1e-3


def test_output_final_state_off_returns_none(op_name):
    q, k, v, *gates = make_inputs(op_name, 1, 5, 1, 4, 4)
    for form in _forms(op_name)[:2]:
        assert form(q, k, v, *gates)[1] is None


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_packed_variable_lengths_equal_separate_sequences(op_name, form):
    lengths = [1, 70, 33, 0, 16]
    T, H, K, V = sum(lengths), 2, 8, 6
    q, k, v, *gates = make_inputs(op_name, 1, T, H, K, V, seed=3)
    S0 = torch.randn(len(lengths), H, K, V, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    fn = getattr(ops, f"{op_name}_{form}")
    kw = {"chunk_size": 16} if form == "chunk" else {}
    o, s = fn(q, k, v, *gates, initial_state=S0, output_final_state=True, cu_seqlens=cu, **kw)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        ref = getattr(ops, f"{op_name}_recurrent")
        o_n, s_n = ref(q[:, a:b], k[:, a:b], v[:, a:b], *(x[:, a:b] for x in gates),
                       initial_state=S0[n : n + 1], output_final_state=True) if b > a else (None, S0[n : n + 1])
        if b > a:
            assert rel_err(o[:, a:b], o_n) < 1e-10
        assert rel_err(s[n : n + 1], s_n) < 1e-10


def test_split_prefill_equals_one_pass(op_name):
    rng = random.Random(7)
    B, T, H, K, V = 2, 150, 2, 16, 8
    q, k, v, *gates = make_inputs(op_name, B, T, H, K, V, seed=11)
    chunk = getattr(ops, f"{op_name}_chunk")
    o_full, s_full = chunk(q, k, v, *gates, output_final_state=True, chunk_size=32)
    cuts = sorted(rng.sample(range(1, T), 3))
    state, outs = None, []
    for a, b in zip([0, *cuts], [*cuts, T], strict=True):
        o, state = chunk(q[:, a:b], k[:, a:b], v[:, a:b], *(x[:, a:b] for x in gates),
                         initial_state=state, output_final_state=True, chunk_size=32)
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), o_full) < 1e-10
    assert rel_err(state, s_full) < 1e-10


def test_chunk_gradients_equal_recurrent_autograd(op_name):
    B, T, H, K, V = 2, 45, 2, 8, 4
    inputs = make_inputs(op_name, B, T, H, K, V, seed=5)
    S0 = torch.randn(B, H, K, V, dtype=torch.float64)
    grads = {}
    for form in ("recurrent", "chunk"):
        leaves = [x.clone().requires_grad_() for x in [*inputs, S0]]
        fn = getattr(ops, f"{op_name}_{form}")
        kw = {"chunk_size": 16} if form == "chunk" else {}
        o, s = fn(*leaves[:-1], initial_state=leaves[-1], output_final_state=True, **kw)
        gen = torch.Generator().manual_seed(1)
        loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + (s * s).sum()
        grads[form] = torch.autograd.grad(loss, leaves)
    for name, a, b in zip(["q", "k", "v", *OP_GATES[op_name], "initial_state"],
                          grads["chunk"], grads["recurrent"], strict=True):
        assert rel_err(a, b) < 1e-10, name


def test_float32_chunk_close_to_float64(op_name):
    B, T, H, K, V = 2, 200, 2, 32, 32
    inputs = make_inputs(op_name, B, T, H, K, V, seed=9)
    chunk = getattr(ops, f"{op_name}_chunk")
    o64, s64 = chunk(*inputs, output_final_state=True)
    o32, s32 = chunk(*[x.float() for x in inputs], output_final_state=True)
    assert o32.dtype == torch.float32 and s32.dtype == torch.float32
    assert rel_err(o32, o64) < 1e-4 and rel_err(s32, s64) < 1e-4


def test_dispatch_on_cpu_runs_the_reference(op_name):
    inputs = make_inputs(op_name, 1, 20, 2, 8, 8)
    fn = getattr(ops, op_name)
    o_auto, _ = fn(*inputs)
    o_ref, _ = getattr(ops, f"{op_name}_recurrent")(*inputs)
    assert rel_err(o_auto, o_ref) < 1e-10
    with pytest.raises(ValueError, match="backend='fla'"):
        fn(*inputs, backend="fla")


def test_scale_defaults_to_inverse_sqrt_head_dim(op_name):
    inputs = make_inputs(op_name, 1, 10, 1, 16, 4)
    fn = getattr(ops, f"{op_name}_chunk")
    o_default, _ = fn(*inputs)
    o_one, _ = fn(*inputs, scale=1.0)
    assert rel_err(o_default, o_one / 4.0) < 1e-12
