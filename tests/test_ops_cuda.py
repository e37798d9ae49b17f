"""The CUDA dispatch path against the float64 reference. Skipped without a GPU; run it on the
lent GPU with `python -m pytest tests/test_ops_cuda.py` (see benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch
from conftest import OP_GATES, make_inputs, rel_err

from hippolm import ops
from hippolm.ops import fla_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# H=16, head dims 128 only: each new (heads, head dim, dtype) costs minutes of Triton autotuning.
SHAPES = [(2, 100, 16, 128, 128), (1, 1000, 16, 128, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}K{}V{}".format(*s))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_cuda_dispatch_matches_reference(op_name, shape, dtype, tol, mode):
    B, T, H, K, V = shape
    ref_in = make_inputs(op_name, B, T, H, K, V, seed=T)
    S0 = torch.randn(B, H, K, V, dtype=torch.float64)
    o_ref, s_ref = getattr(ops, f"{op_name}_chunk")(*ref_in, initial_state=S0, output_final_state=True)
    gpu_in = [x.cuda().to(dtype) for x in ref_in[:3]] + [x.cuda().float() for x in ref_in[3:]]
    fn = getattr(ops, op_name)
    o, s = fn(*gpu_in, initial_state=S0.cuda().float(), output_final_state=True, mode=mode)
    assert o.dtype == dtype and o.device.type == "cuda"
    assert rel_err(o.cpu(), o_ref) < tol and rel_err(s.cpu(), s_ref) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 5e-2)])
def test_cuda_dispatch_gradients_match_reference(op_name, dtype, tol):
    B, T, H, K, V = 2, 200, 16, 128, 128
    ref_in = make_inputs(op_name, B, T, H, K, V, seed=1)
    grads = {}
    for where in ("reference", "cuda"):
        leaves = [x.clone().requires_grad_() for x in ref_in] if where == "reference" else [
            (x.cuda().to(dtype) if i < 3 else x.cuda().float()).requires_grad_() for i, x in enumerate(ref_in)]
        fn = getattr(ops, f"{op_name}_chunk") if where == "reference" else getattr(ops, op_name)
        o, _ = fn(*leaves)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        loss = (o.double() * w.to(o.device)).sum()
        grads[where] = [g.cpu() for g in torch.autograd.grad(loss, leaves)]
    for name, a, b in zip(["q", "k", "v", *OP_GATES[op_name]], grads["cuda"], grads["reference"], strict=True):
        assert rel_err(a, b) < tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_packed_variable_lengths(op_name, dtype):
    lengths = [300, 1, 77, 128]
    T, H, K, V = sum(lengths), 16, 128, 128
    ref_in = make_inputs(op_name, 1, T, H, K, V, seed=2)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    o_ref, s_ref = getattr(ops, f"{op_name}_chunk")(*ref_in, cu_seqlens=cu, output_final_state=True)
    gpu_in = [x.cuda().to(dtype) for x in ref_in[:3]] + [x.cuda().float() for x in ref_in[3:]]
    o, s = getattr(ops, op_name)(*gpu_in, cu_seqlens=cu.cuda(), output_final_state=True)
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    assert rel_err(o.cpu(), o_ref) < tol and rel_err(s.cpu(), s_ref) < tol


def test_report_backend():
    """Prints which kernel the dispatch picks here; asserts FLA is used where it is right."""
    for dtype in (torch.bfloat16, torch.float32):
        for op in OP_GATES:
            for grad in (False, True):
                t = torch.zeros(1, 8, 1, 128, device="cuda", dtype=dtype, requires_grad=grad)
                form, why = fla_backend.plan(op, "chunk", t, t, [t])
                print(f"{dtype} {op} {'grad' if grad else 'no-grad'} -> {form or 'torch'} ({why})")
                if not grad and fla_backend.fla_available():
                    assert form is not None


@pytest.mark.skipif(not fla_backend.fla_available(), reason="needs FLA")
@pytest.mark.parametrize("op_name", ["ssd", "gated_delta_rule"])
@pytest.mark.parametrize("packed", [False, True])
def test_fla_with_our_gated_backward_kernel(op_name, packed):
    """FLA's gated chunk kernels with our dq/dk/dw/dg kernel (hippolm.ops.fla_gated; what "auto"
    runs for 16-bit training on Hopper with Triton 3.4-3.7.0): bf16 outputs, final state and every
    gradient (initial state and final-state gradient included) against the float64 reference of the
    rounded inputs, < 2e-2."""
    lengths = [300, 1, 77, 128] if packed else [500, 500]
    B, T = (1, sum(lengths)) if packed else (2, 500)
    H, K, V = 16, 128, 128  # the shapes above: FLA's autotuning is cached for them
    xs = make_inputs(op_name, B, T, H, K, V, seed=11)
    xs = [x.to(torch.bfloat16 if i < 3 else torch.float32).double() for i, x in enumerate(xs)]  # rounded
    N = len(lengths) if packed else B
    s0 = torch.randn(N, H, K, V, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]) if packed else None
    gen = torch.Generator().manual_seed(6)
    w_o, w_s = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64), torch.randn(N, H, K, V, generator=gen,
                                                                                          dtype=torch.float64)
    results = {}
    for where in ("reference", "cuda"):
        dev = "cuda"
        leaves = [(x.to(dev) if where == "reference" else x.to(dev, torch.bfloat16 if i < 3 else torch.float32))
                  .requires_grad_() for i, x in enumerate([*xs, s0])]
        *inputs, state = leaves
        cu_d = None if cu is None else cu.to(dev)
        if where == "reference":
            o, s = getattr(ops, f"{op_name}_chunk")(*inputs, initial_state=state, output_final_state=True,
                                                   cu_seqlens=cu_d)
        else:
            g, beta = inputs[3], (inputs[4] if op_name == "gated_delta_rule" else None)
            o, s = fla_backend.run(op_name, "chunk_patched", *inputs[:3], g, beta, None, state, True, cu_d)
        # + s.sum(): its gradient reaches the op expanded (stride 0), which FLA reads as contiguous
        loss = (o.double() * w_o.to(dev)).sum() + (s.double() * w_s.to(dev)).sum() + 0.1 * s.sum()
        results[where] = [o, s, *torch.autograd.grad(loss, leaves)]
    names = ["o", "final state", "dq", "dk", "dv", *[f"d{n}" for n in OP_GATES[op_name]], "d initial state"]
    for name, a, b in zip(names, results["cuda"], results["reference"], strict=True):
        assert rel_err(a.cpu(), b.cpu()) < 2e-2, (name, rel_err(a.cpu(), b.cpu()))
