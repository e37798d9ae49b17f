"""Our log-linear Gated DeltaNet level kernels compiled for Hopper (sm_90) and Ampere (sm_80)
without a GPU (Triton's bundled ptxas), with the tiles and launch options the host picks.

Catches what the CPU interpreter cannot: code the compiler rejects (a loop-carried float32 state
re-assigned from a 16-bit load once broke the 16-bit backward) and tiles that need more shared
memory than the GPU has. Skipped where Triton is missing (CPU CI) or interpreting.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles, does not interpret"),
]

# Shared memory per block (bytes): H100, A100.
SHARED = {9: 232448, 8: 166912}


def _compile(which: str, prec: str, major: int, K: int = 128, V: int = 128, C: int = 64):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hippolm.ops import triton_gdn

    fn = triton_gdn._level_fwd if which == "fwd" else triton_gdn._level_bwd
    BK, BV, NL, _ = triton_gdn._level_tiles(K, V, which, prec)
    consts = {"C": C, "BK": BK, "BV": BV, "NL": NL, "PREC": prec}
    operand = "bf16" if prec == "tf32" else "fp32"
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name in ("w_ptr", "u_ptr", "kd_ptr", "qw_ptr", "hs_ptr"):
            sig[name] = "*" + operand
        else:
            sig[name] = "*fp32" if name.endswith("_ptr") else "i32"
        if name.endswith("_ptr") or name in ("K", "V"):  # as the launcher specialises aligned arguments
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = triton_gdn._level_launch(prec, major, which == "bwd")
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", major * 10, 32), options=options)


@pytest.mark.parametrize("which", ["fwd", "bwd"])
@pytest.mark.parametrize("prec,major", [("tf32", 9), ("ieee", 8)])
def test_level_kernels_compile_and_fit_shared_memory(which, prec, major):
    """16-bit operands on Hopper (the fast path) and float32 on an A100 (the tightest shared memory)."""
    kernel = _compile(which, prec, major)
    assert 0 < kernel.metadata.shared <= SHARED[major], kernel.metadata.shared
