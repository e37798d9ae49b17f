"""Our Triton kernels (Gated DeltaNet state scan and chunk kernels, the log-linear trees, decode
steps) compiled for Hopper (sm_90) and Ampere (sm_80) without a GPU (Triton's bundled ptxas), with the
tiles and launch options the host picks.

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
# Integer arguments a multiple of 16 at the benchmarked shapes (H = 16, d = 128, chunks of 64, T = 8k or 64k:
# n = T / 64, the output's strides): the launcher specialises them (divisibility 16), so these compiles do too.
DIVISIBLE = ("K", "V", "H", "n", "sB", "sH", "sT")


def _compile(fn, consts: dict, options: dict, major: int, operand: str, operand_ptrs=(), ptr_types=None,
             aligned=DIVISIBLE):
    """``fn`` compiled for ``major`` (9: sm_90, 8: sm_80): pointers in ``operand_ptrs`` of type
    ``operand``, those in ``ptr_types`` of the type given there, other pointers float32, ``scale`` and
    ``eps`` float32, other runtime arguments int32; pointers and the integers in ``aligned`` marked
    divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name in (ptr_types or {}):
            sig[name] = "*" + ptr_types[name]
        elif name in operand_ptrs:
            sig[name] = "*" + operand
        elif name in ("scale", "eps"):
            sig[name] = "fp32"
        else:
            sig[name] = "*fp32" if name.endswith("_ptr") else "i32"
        if sig[name].startswith("*") or name in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", major * 10, 32), options=options)


def _options(options: dict, warps: int | None) -> dict:
    return options | ({"num_warps": warps} if warps else {})


def chunk_kernel_compiled(which: str, prec: str, major: int, warps: int | None = None):
    """The fused chunk kernels of log-linear Gated DeltaNet (head dim 128, chunks of 64): ``which`` fwd,
    bwd or bwd_qk (the backward's second kernel)."""
    from hippolm.ops import triton_gdn_chunk as tc

    BK, BV = tc._blocks(128, 128, "fwd" if which == "fwd" else "bwd")
    ptrs = ("q_ptr", "k_ptr", "v_ptr", "w_ptr", "u_ptr", "kd_ptr", "qw_ptr", "dq_ptr", "dk_ptr", "dv_ptr",
            "dw_ptr", "du_ptr", "dkd_ptr", "dqw_ptr", "cc_ptr", "o_ptr", "do_ptr")  # o, do: the op's output type
    operand = "bf16" if prec == "tf32" else "fp32"
    if which == "bwd_qk":
        return _compile(tc._chunk_bwd_qk, {"C": 64, "BK": BK, "PREC": prec},
                        {"num_warps": warps or tc.CHUNK_TILES["bwd"]["qk_warps"],
                         "num_stages": tc.CHUNK_TILES["bwd"]["num_stages"]}, major, operand, ptrs)
    consts = {"C": 64, "CB": 6, "BK": BK, "BV": BV, "PREC": prec} | (
        {"HAS_DMIX": True} if which == "bwd" else {"SOLVE": tc.CHUNK_TILES["fwd"]["solve"]})
    return _compile(tc._chunk_fwd if which == "fwd" else tc._chunk_bwd, consts, _options(tc._launch(which), warps),
                    major, operand, ptrs)


def tree_kernels_compiled(prec: str, major: int, warps: int | None = None) -> list[tuple[str, object]]:
    """(name, compiled kernel) of the tree-of-summaries forward and backward (triton_gdn_tree) at
    head dim 128, chunks of 64, with the host's tiles and do as the op passes it (the output
    gradient itself, strided, in the op's type)."""
    from hippolm.ops import triton_gdn_tree as tt

    operand = "bf16" if prec == "tf32" else "fp32"
    ptrs = ("w_ptr", "u_ptr", "kd_ptr", "qw_ptr", "m_ptr", "qb_ptr", "dqa_ptr", "dqw_ptr", "du_ptr", "dw_ptr",
            "dkd_ptr", "up_ptr")
    opts = {"num_warps": warps or tt.TREE_TILES["num_warps"]}
    BN, BV = tt.TREE_TILES["BN"], tt.TREE_TILES["BV"]
    do = {"do_ptr": operand}
    bwd = tt.TREE_BWD_TILES

    def bwd_opts(kernel: str, key: str) -> tuple[int, dict]:
        return (bwd[key if prec == "tf32" else "fp32_BN"] if key.endswith("BN") else bwd[key],
                {"num_warps": warps or bwd[kernel + "_warps"]})

    BVp, popts = bwd_opts("pairs", "pairs_BV")
    BNn, nopts = bwd_opts("node", "node_BN")
    BNl, lopts = bwd_opts("leaf", "leaf_BN")
    backward = [*((f"_tree_pairs leaves={leaves}",
                   _compile(tt._tree_pairs, {"C": 64, "K": 128, "BK": 128, "BV": BVp,
                                             "LEAVES": leaves, "PREC": prec},
                            popts, major, operand, ptrs, {"offs_ptr": "i32"} | do))
                  for leaves in (True, False)),
                *((f"_tree_node_grads atomic={atomic}",
                   _compile(tt._tree_node_grads, {"C": 64, "BK": 128, "BN": BNn, "ATOMIC": atomic,
                                                    "PREC": prec},
                            nopts, major, operand, ptrs, {"offs_ptr": "i32"} | do | (
                                {"dm_ptr": "fp32", "up_ptr": "fp32"} if atomic else {"dm_ptr": operand})))
                  for atomic in (False, True)),
                *((f"_tree_leaf_grads leaves={leaves}" + (" split sides" if split else ""),
                   _compile(tt._tree_leaf_grads, {"C": 64, "K": 128, "BK": 128, "BN": BNl,
                                                  "LEAVES": leaves, "SPLIT_SIDES": split, "PREC": prec},
                            lopts, major, operand, ptrs, do))
                  for leaves in (True, False) for split in ((False, True) if prec == "tf32" else (False,)))]
    return [("_tree_leaves", _compile(tt._tree_leaves, {"C": 64, "BK": 128, "BN": BN, "PREC": prec}, opts, major,
                                      operand, ptrs)),
            ("_tree_merge", _compile(tt._tree_merge, {"BK": 128, "BN": BN, "PREC": prec}, opts, major, operand, ptrs)),
            ("_tree_merge_leaves", _compile(tt._tree_merge_leaves, {"C": 64, "BK": 128, "BN": BN, "PREC": prec}, opts,
                                            major, operand, ptrs)),
            *((f"_tree_read leaves={leaves}",
               _compile(tt._tree_read, {"C": 64, "BK": 128, "BV": BV, "LEAVES": leaves, "PREC": prec}, opts, major,
                        operand, ptrs, {"offs_ptr": "i32", "out_ptr": operand, "o0_ptr": operand}))
              for leaves in (True, False)), *backward]


@pytest.mark.parametrize("prec,major", [("tf32", 9), ("ieee", 8)])
def test_tree_kernels_compile_and_fit_shared_memory(prec, major):
    for name, kernel in tree_kernels_compiled(prec, major):
        assert 0 < kernel.metadata.shared <= SHARED[major], (name, kernel.metadata.shared)


@pytest.mark.parametrize("which", ["fwd", "bwd", "bwd_qk"])
@pytest.mark.parametrize("prec,major", [("tf32", 9), ("ieee", 8)])
def test_chunk_kernels_compile_and_fit_shared_memory(which, prec, major):
    kernel = chunk_kernel_compiled(which, prec, major)
    assert 0 < kernel.metadata.shared <= SHARED[major], kernel.metadata.shared


def loglinear_mamba2_compiled(major: int, warps: int | None = None) -> list[tuple[str, object]]:
    """(name, compiled kernel) of every log-linear Mamba-2 kernel with bf16 inputs at head dim 128, with
    the host's tiles, warps and module options (shared with benchmarks/kernel_spills.py)."""
    import torch

    from hippolm.ops import triton_loglinear as tll

    q = torch.empty(1, 64, 1, 128, dtype=torch.bfloat16)
    p = tll._Plan(q, q, torch.empty(1, 64, 1, 20), 64)
    ptrs = ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "o_ptr", "dq_ptr", "dk_ptr", "dv_ptr")
    types = {"gch_ptr": "fp64", "toff_ptr": "i32", "doff_ptr": "i32"}
    common = {"C": p.C, "BK": p.BK, "PREC": p.prec}
    kernels = {
        "_build_block": (tll._build_block, {"BV": p.BV_fwd, "GM": p.grad_mode, "S": tll.BUILD_LEVELS}),  # 1 chunk: S=0
        "_fwd": (tll._fwd, {"CB": p.CB, "BV": p.BV_fwd}),
        "_bwd_q": (tll._bwd_q, {"CB": p.CB, "BV": p.BV_full // p.q_pieces, "NP": p.q_pieces, "GM": p.grad_mode}),
        "_direct": (tll._direct, {"CB": p.CB, "BV": p.BV, "GM": p.grad_mode}),
        "_bwd_kv": (tll._bwd_kv, {"CB": p.CB, "BV": p.BV_full // p.kv_pieces, "NP": p.kv_pieces,
                                  "GM": p.grad_mode}),
    }
    return [(name, _compile(fn, common | consts, _options({"num_warps": p.warps}, warps), major, "bf16", ptrs, types))
            for name, (fn, consts) in kernels.items()]


@pytest.mark.parametrize("major", [9, 8])
@pytest.mark.parametrize("operands,pieces,fwd_tile", [(1, 1, 64), (2, 1, 128), (2, 4, 64)])
def test_loglinear_mamba2_kernels_compile_and_fit_shared_memory(major, operands, pieces, fwd_tile, monkeypatch):
    """Every log-linear Mamba-2 kernel with bf16 inputs at head dim 128 (the backward's float32 operands
    of GRAD_OPERANDS 1 double its tiles; 2: hi + lo bf16 parts; V in 1 or 4 pieces; forward V tiles of
    64 or 128 columns)."""
    from hippolm.ops import triton_loglinear as tll

    for name, value in (("GRAD_OPERANDS", operands), ("Q_V_PIECES", pieces), ("KV_V_PIECES", pieces),
                        ("FWD_V_TILE", fwd_tile)):
        monkeypatch.setattr(tll, name, value)
    for name, kernel in loglinear_mamba2_compiled(major):
        assert 0 < kernel.metadata.shared <= SHARED[major], (name, kernel.metadata.shared)


@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_state_scan_kernels_compile_and_fit_shared_memory(which):
    """The linear Gated DeltaNet state scan (float32 tiles, TF32 dots) on Hopper."""
    from hippolm.ops import triton_gdn

    BK, BV, _ = triton_gdn._tile_sizes(128, 128)
    consts = {"C": 64, "BK": BK, "BV": BV, "PREC": "tf32"} | ({"HAS_S0": True} if which == "fwd" else {})
    options = {"num_warps": 8, "num_stages": 2}  # _launch's choice for TF32 on Hopper
    kernel = _compile(triton_gdn._scan_fwd if which == "fwd" else triton_gdn._scan_bwd, consts, options, 9, "fp32")
    assert 0 < kernel.metadata.shared <= SHARED[9], kernel.metadata.shared


def memory_step_compiled(major: int, proj: bool = True, warps: int | None = None):
    """The AHN memory's cached decode step (Gated DeltaNet, bf16 cache, float32 state, d = 128; shared with
    benchmarks/kernel_spills.py)."""
    from hippolm.ops import decode

    fn = decode._memory_step_cache_kernel
    consts = {"KD": 128, "VD": 128, "G_IDX": 0, "BETA_IDX": 1, "DELTA": True, "HAS_PROJ": proj}
    ptr_types = {name: "bf16" for name in ("Q", "KEYS", "VALUES", "RING_G", "NW", "GATE", "OPROJ")}
    ptr_types |= {"CURSOR": "i64", "STATE": "fp32", "OUT": "fp32"}
    # multiples of 16 at the Qwen2.5-3B decode shape (H = 16, 128 sinks + 32,640 window), as launched
    aligned = ("H", "sinks", "window", "sqb", "sqh", "skb", "skh", "sks", "svb", "svh", "svs", "sgb", "sgw")
    return _compile(fn, consts, {"num_warps": warps or decode.MEMORY_STEP_WARPS}, major, "bf16", (), ptr_types,
                    aligned)


@pytest.mark.parametrize("major", [9, 8])
@pytest.mark.parametrize("proj", [True, False])
def test_memory_step_kernel_compiles(major, proj):
    """With and without the read-out projection (the AHN memories always have one)."""
    kernel = memory_step_compiled(major, proj)
    assert kernel.metadata.shared <= SHARED[major] and kernel.asm["cubin"]
