"""Decode ops: the Triton kernels against the float64 references (on CUDA, or on CPU through
Triton's interpreter when triton is installed; skipped otherwise), and the CPU dispatch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hippolm.ops import decode as dc

HERE = Path(__file__).parent


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_kernels_on_cuda():
    import decode_kernel_cases as cases
    from ahn_kernel_cases import ahn_decode_cases

    dtypes = (torch.float32, torch.bfloat16)
    assert (cases.attention_cases("cuda", dtypes) + cases.cache_attention_cases("cuda", dtypes)
            + cases.memory_cases("cuda") + cases.cache_cases("cuda") + cases.loglinear_cases("cuda")
            + cases.loglinear_cache_cases("cuda") + cases.step_cases("cuda")
            + cases.standalone_decode_case("cuda") + ahn_decode_cases("cuda")) == []


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="interpreter run only on a CPU machine with triton installed")
def test_decode_kernels_in_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE)]))
    for case in ("decode_kernel_cases.py", "ahn_kernel_cases.py"):  # the ops, then an AHN model decoding
        run = subprocess.run([sys.executable, str(HERE / case), "cpu"], env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr


def test_cpu_dispatch_updates_state_in_place_like_the_reference():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 16, generator=gen), torch.randn(2, 2, 16, generator=gen), torch.randn(2, 2, 16,
                                                                                                      generator=gen)
    g, beta, gate = -torch.rand(2, 4, generator=gen), torch.rand(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    state = torch.randn(2, 4, 16, 16, generator=gen)
    ref_o, ref_s = dc.memory_step_reference(q, k, v, g, beta, True, state, torch.ones(16), gate, 1e-6, 0.25)
    ptr = state.data_ptr()
    o = dc.memory_step(q, k, v, g, beta, True, state, torch.ones(16), gate, scale=0.25)
    assert state.data_ptr() == ptr and torch.allclose(state, ref_s) and torch.allclose(o, ref_o)
    kk, vv = torch.randn(2, 2, 40, 16, generator=gen), torch.randn(2, 2, 40, 16, generator=gen)
    full = torch.softmax(torch.einsum("bhd,bhsd->bhs", q, kk.repeat_interleave(2, 1)) * 0.25, -1)
    want = torch.einsum("bhs,bhsd->bhd", full, vv.repeat_interleave(2, 1))
    assert torch.allclose(dc.decode_attention(q, kk, vv, 0.25), want, atol=1e-5)


def test_cpu_loglinear_step_updates_state_in_place_like_step_unchecked():
    from hippolm.ops import LogLinearState
    from hippolm.ops.loglinear import step_unchecked

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 8, generator=gen) for _ in range(3))
    g, beta, lam = -torch.rand(3, 2, generator=gen), torch.rand(3, 2, generator=gen), torch.rand(3, 2, 5, generator=gen)
    slots, pos = torch.randn(3, 2, 5, 8, 8, generator=gen), torch.tensor([0, 3, 8])
    want_o, want = step_unchecked(q, k, v, g, beta, lam, LogLinearState(slots.clone(), pos.clone()), 0.5)
    state = LogLinearState(slots.clone(), pos.clone())
    kept = state.slots
    o = dc.loglinear_step_(q, k, v, g, beta, lam, state, 0.5)
    assert state.slots is kept and torch.allclose(kept, want.slots) and torch.allclose(o, want_o)
    assert state.position.tolist() == [1, 4, 9]
    # where nothing leaves an AHN window (valid False) no step: slots and position kept, read 0
    state = LogLinearState(slots.clone(), pos.clone())
    o = dc.loglinear_step_(q, k, v, g, beta, lam, state, 0.5, valid=torch.tensor([True, False, True]))
    assert torch.allclose(state.slots[[0, 2]], want.slots[[0, 2]]) and torch.equal(state.slots[1], slots[1])
    assert torch.allclose(o[[0, 2]], want_o[[0, 2]]) and (o[1] == 0).all()
    assert state.position.tolist() == [1, 3, 9]
