"""Gated DeltaNet chunk form for float32 training on CUDA (FLA's chunk kernels compute in TF32),
where FLA is missing, and log-linear Gated DeltaNet: the chunk-parallel parts (decay masks, the WY /
UT transform, the chunk's own output) in the fused kernels of :mod:`.triton_gdn_chunk`; the
sequential part, the inter-chunk state recurrence, a Triton scan with a hand-written reverse-scan
backward (linear) or the tree of block summaries of :mod:`.triton_gdn_tree` (log-linear).

Per chunk i, with S_i the state at its start (as in :func:`hippolm.ops.reference.chunk_factors`):

    v_new_i = u_i - w_i S_i                        (pseudo-values corrected by the incoming state)
    S_{i+1} = gamma_i S_i + kd_i^T v_new_i         (kd: keys decayed to the chunk end)
    o_i     = (q_i * gamma_r) S_i + attn_i v_new_i

Imported lazily (only by :mod:`hippolm.ops.triton_backend`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import reference
from .loglinear import bit_length
from .triton_gdn_chunk import ChunkParts
from .triton_gdn_tree import _key_block, tree_backward, tree_reads


@triton.jit
def _tiles(K, V, iv, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and masks for V tile ``iv``: [K, V] state tiles, [C, K] and [C, V] chunk rows, and
    [K, C]: a [C, K] tile read or written transposed."""
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    cc = tl.arange(0, C)
    return (kk[:, None] * V + vv[None, :], (kk[:, None] < K) & (vv[None, :] < V),
            cc[:, None] * K + kk[None, :], kk[None, :] < K,
            cc[:, None] * V + vv[None, :], vv[None, :] < V,
            cc[None, :] * K + kk[:, None], kk[:, None] < K)


@triton.jit
def _write(w_ptr, u_ptr, kd_ptr, ge_ptr, base, S, tile_ck, mck, tile_cv, umask, K, V,
           C: tl.constexpr, PREC: tl.constexpr):
    """Chunk ``base`` of the state recurrence: (S <- ge S + kd^T v_new, v_new = u - w S); u is read
    where ``umask`` (elsewhere 0: the state only evolves). Dot operands in w's type."""
    dt = w_ptr.dtype.element_ty
    w = tl.load(w_ptr + base * (C * K) + tile_ck, mask=mck, other=0)
    u = tl.load(u_ptr + base * (C * V) + tile_cv, mask=umask, other=0)
    kd = tl.load(kd_ptr + base * (C * K) + tile_ck, mask=mck, other=0)
    vn = u - tl.dot(w, S.to(dt), input_precision=PREC)
    return tl.load(ge_ptr + base) * S + tl.dot(tl.trans(kd), vn.to(dt), input_precision=PREC), vn


@triton.jit
def _scan_fwd(w_ptr, u_ptr, kd_ptr, ge_ptr, s0_ptr, h_ptr, vn_ptr, st_ptr, n, K, V,
              C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr, PREC: tl.constexpr):
    """One (sequence, head) and V tile: states at every chunk start, corrected pseudo-values, final state."""
    bh = tl.program_id(0).to(tl.int64)
    tile_kv, mkv, tile_ck, mck, tile_cv, mcv, _, _ = _tiles(K, V, tl.program_id(1), C, BK, BV)
    if HAS_S0:
        S = tl.load(s0_ptr + bh * (K * V) + tile_kv, mask=mkv, other=0).to(tl.float32)
    else:
        S = tl.zeros((BK, BV), dtype=tl.float32)
    for i in range(n):
        base = bh * n + i
        tl.store(h_ptr + base * (K * V) + tile_kv, S, mask=mkv)
        S, vn = _write(w_ptr, u_ptr, kd_ptr, ge_ptr, base, S, tile_ck, mck, tile_cv, mcv, K, V, C, PREC)
        tl.store(vn_ptr + base * (C * V) + tile_cv, vn, mask=mcv)
    tl.store(st_ptr + bh * (K * V) + tile_kv, S, mask=mkv)


@triton.jit
def _scan_bwd(w_ptr, kd_ptr, ge_ptr, h_ptr, vn_ptr, dh_ptr, dvn_ptr, dst_ptr,
              du_ptr, dw_ptr, dkd_ptr, dge_ptr, ds0_ptr, n, NBH, K, V,
              C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Reverse scan; dw, dkd, dge are partial sums over this V tile (added up on the host)."""
    bh = tl.program_id(0).to(tl.int64)
    tile_kv, mkv, tile_ck, mck, tile_cv, mcv, tile_kc, mkc = _tiles(K, V, tl.program_id(1), C, BK, BV)
    part = tl.program_id(1) * NBH * n  # this V tile's slice of the partial outputs [NV, N*H, n, ...]
    dS = tl.load(dst_ptr + bh * (K * V) + tile_kv, mask=mkv, other=0)  # gradient of S_{i+1}
    for ii in range(n):
        i = n - 1 - ii
        base = bh * n + i
        kd = tl.load(kd_ptr + base * (C * K) + tile_ck, mask=mck, other=0)
        w = tl.load(w_ptr + base * (C * K) + tile_ck, mask=mck, other=0)
        S = tl.load(h_ptr + base * (K * V) + tile_kv, mask=mkv, other=0)
        vn = tl.load(vn_ptr + base * (C * V) + tile_cv, mask=mcv, other=0)
        ge = tl.load(ge_ptr + base)
        dvn = tl.load(dvn_ptr + base * (C * V) + tile_cv, mask=mcv, other=0) + tl.dot(kd, dS, input_precision=PREC)
        tl.store(du_ptr + base * (C * V) + tile_cv, dvn, mask=mcv)
        pbase = part + base
        tl.store(dw_ptr + pbase * (C * K) + tile_ck, -tl.dot(dvn, tl.trans(S), input_precision=PREC), mask=mck)
        # dkd = vn dS^T, computed as (dS vn^T)^T and stored transposed: dS is a dot accumulator, and
        # tl.trans of one feeding a tl.dot is what Triton 3.4-3.7.0 miscompiles on Hopper (FLA #640).
        dkd_t = tl.dot(dS, tl.trans(vn), input_precision=PREC)  # [BK, C]
        tl.store(dkd_ptr + pbase * (C * K) + tile_kc, dkd_t, mask=mkc)
        tl.store(dge_ptr + pbase, tl.sum(tl.sum(dS * S, axis=1), axis=0))
        dS = ge * dS - tl.dot(tl.trans(w), dvn, input_precision=PREC)
        dS += tl.load(dh_ptr + base * (K * V) + tile_kv, mask=mkv, other=0)
    tl.store(ds0_ptr + bh * (K * V) + tile_kv, dS, mask=mkv)


def _tile_sizes(K: int, V: int) -> tuple[int, int, int]:
    BK = _key_block(K)
    BV = min(32, max(16, triton.next_power_of_2(V)))
    return BK, BV, -(-V // BV)


def _launch(prec: str, device: torch.device) -> dict:
    # ptxas for sm_90 at K=128, BV=32: 2 stages fit Hopper's shared memory (172/205 KB of 227) with
    # TF32 dots, not an A100's (164 KB); the IEEE float32 dots (register-hungry FMA loops) get 1 stage.
    return {"num_warps": 8, "num_stages": 2 if prec == "tf32" and _major(device) >= 9 else 1}


def _major(device: torch.device) -> int:
    """Compute capability major of ``device`` (0 off CUDA)."""
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0


class _Scan(torch.autograd.Function):
    """(w, u, kd [N, H, n, C, *], ge [N, H, n], S0 [N, H, K, V] or None) -> (states, v_new, final)."""

    @staticmethod
    def forward(ctx, w, u, kd, ge, s0, prec: str):
        N, H, n, C, K = w.shape
        V = u.shape[-1]
        w, u, kd, ge = (x.contiguous() for x in (w, u, kd, ge))
        h = w.new_empty(N, H, n, K, V)
        vn = torch.empty_like(u)
        st = w.new_empty(N, H, K, V)
        BK, BV, NV = _tile_sizes(K, V)
        s0c = None if s0 is None else s0.float().contiguous()
        _scan_fwd[(N * H, NV)](w, u, kd, ge, s0c if s0c is not None else st, h, vn, st, n, K, V,
                               C=C, BK=BK, BV=BV, HAS_S0=s0c is not None, PREC=prec, **_launch(prec, w.device))
        ctx.save_for_backward(w, kd, ge, h, vn)
        ctx.prec, ctx.has_s0, ctx.s0_dtype = prec, s0 is not None, None if s0 is None else s0.dtype
        return h, vn, st

    @staticmethod
    def backward(ctx, dh, dvn, dst):
        w, kd, ge, h, vn = ctx.saved_tensors
        N, H, n, C, K = w.shape
        V = vn.shape[-1]
        BK, BV, NV = _tile_sizes(K, V)
        dh = torch.zeros_like(h) if dh is None else dh.contiguous()
        dvn = torch.zeros_like(vn) if dvn is None else dvn.contiguous()
        dst = w.new_zeros(N, H, K, V) if dst is None else dst.float().contiguous()
        du = torch.empty_like(vn)
        dw = w.new_empty(NV, N, H, n, C, K)
        dkd = w.new_empty(NV, N, H, n, C, K)
        dge = w.new_empty(NV, N, H, n)
        ds0 = w.new_empty(N, H, K, V)
        _scan_bwd[(N * H, NV)](w, kd, ge, h, vn, dh, dvn, dst, du, dw, dkd, dge, ds0, n, N * H, K, V,
                               C=C, BK=BK, BV=BV, PREC=ctx.prec, **_launch(ctx.prec, w.device))
        return (dw.sum(0), du, dkd.sum(0), dge.sum(0), ds0.to(ctx.s0_dtype) if ctx.has_s0 else None, None)


# 1 keeps the forward's tree for the backward (2.1 GB more held per call at 64k tokens,
# H = 16, d = 128, bf16), 0 (default: memory) rebuilds it there: fwd+bwd 28.54 -> 26.95 ms at 64k,
# 26.17 -> 24.28 at 8k (flag_timing_h100_llgdn_tree_save.json). Since o0 is written in place (2026-12-07):
# 18.48 -> 17.33 ms at 8k, 20.55 -> 19.41 at 64k; with LEVEL_TREE_LEAVES_BWD = 0 (half the tree held)
# 18.50 -> 17.37 and 20.81 -> 19.51 (flag_timing_h100_llgdn_tree_save_o0*.json): still slower than flash
# attention at 8k (14.59), so memory stays the default.
LEVEL_TREE_SAVE = 0
# Leaf summaries of the tree (the forward's unless it is kept for the backward, and the backward's rebuilt
# one): 1 stores every chunk's; 0 stores none (height 1, the level-0 reads and, in the backward, their
# pairs and the leaves' sibling terms made from the chunks' factors: counted by level_bytes.py at 64k
# tokens, H = 16, d = 128, bf16, forward 11.6 -> 9.0 GB, backward 29.0 -> 26.1; half the tree's memory).
# H100 (flag_timing_h100_llgdn_tree_leaves.json, both passes at once): forward 7.84 -> 7.11 ms at 64k,
# 7.51 -> 6.80 at 8k, but fwd+bwd 26.66 -> 26.86 and 23.82 -> 24.23: the backward's pairs and leaf
# gradients spilled without leaves on sm_90 (224 / 352 bytes then, 16 / 96 with leaves). So none in the
# forward, all in the backward. Since (pairs 32 bytes, TREE_BWD_TILES["leaf_sides"] = 1: leaf gradients 176),
# a backward without leaves takes the same time and half the rebuilt tree's memory: fwd+bwd 25.01 vs
# 24.95 ms at 64k, 22.44 vs 22.33 at 8k (flag_timing_h100_llgdn_tree_leaves_bwd_split_sides.json). The
# backward's stays 1, as benchmarked next to flash attention (kernels_h100_llgdn_leaf_sides.json); set 0
# to save that memory.
LEVEL_TREE_LEAVES_FWD = 0
LEVEL_TREE_LEAVES_BWD = 1


class _LevelReads(torch.autograd.Function):
    """Every chunk level's read of log-linear Gated DeltaNet, summed and added to o0, through the tree
    of block summaries (:mod:`.triton_gdn_tree`): (o0 [N, n * C, H, V] in the output's type: the
    chunks' own output, w, u, kd, qw [N, H, n, C, *], ge [N, H, n], lam [N, H, n, C, J]: the weight of
    chunk level j) -> o, o0's shape and type. o0's gradient is o's as it comes: no copy (a float32
    copy of do in o0's old [N, H, n, C, V] layout took 0.56 ms of 18.8 at 8k x 8 on the H100,
    llgdn_profile_h100_T8192_split.json); the tree's backward reads do in its [N, T, H, V] layout.
    ``operands``: the type w, u, kd, qw and the summaries take in the kernels (16-bit for 16-bit
    inputs, as FLA's chunk kernels: half the bytes and full-rate tensor cores; in-kernel sums stay
    float32). Until 2026-12-08 the levels could also run as sequential scans per group of levels
    (LEVEL_TREE_FWD / LEVEL_TREE_BWD = 0; H100, fwd+bwd at 64k: 38.95 ms against the tree's first
    29.00, docs/kernels.md); removed then, they are in git history."""

    @staticmethod
    def forward(ctx, o0, w, u, kd, ge, qw, lam, prec: str, operands: torch.dtype):
        w, u, kd, qw = (x.to(operands).contiguous() for x in (w, u, kd, qw))
        ge, lam, o0 = ge.contiguous(), lam.contiguous(), o0.contiguous()
        ctx.save_for_backward(w, u, kd, ge, qw, lam)
        ctx.prec = prec
        leaves = LEVEL_TREE_LEAVES_BWD if LEVEL_TREE_SAVE else LEVEL_TREE_LEAVES_FWD
        out, tree = tree_reads(o0, w, u, kd, ge, qw, lam, prec, leaves=bool(leaves))
        ctx.tree = tree if LEVEL_TREE_SAVE else None  # a buffer of this call's, read once by its backward
        return out

    @staticmethod
    def backward(ctx, do):
        w, u, kd, ge, qw, lam = ctx.saved_tensors
        do0 = do.contiguous()  # o0's gradient; the tree reads it through its [N, H, n * C, V] view
        tree, ctx.tree = ctx.tree, None
        grads = tree_backward(do0.permute(0, 2, 1, 3), w, u, kd, ge, qw, lam, ctx.prec, tree,
                              leaves=bool(LEVEL_TREE_LEAVES_BWD))
        return do0, *grads, None, None


def _padded(xs, T: int, cu_seqlens, B: int, C: int):
    """(bounds, padded length, tensors as [N, length, ...] zero-padded to a multiple of C): zero
    padding at the end is inert (k = 0 writes nothing, g = 0 keeps the state, beta = 0)."""
    bounds = reference._sequence_bounds(T, cu_seqlens, B)
    length = max(C, -(-max(e - s for _, s, e in bounds) // C) * C)
    if cu_seqlens is None and length == T:
        return bounds, length, xs
    return bounds, length, [None if x is None else reference._to_padded(x, bounds, length) for x in xs]


def _rounded_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of 16-bit a, b (same batch shape) with float32 results: tensor cores on CUDA; elsewhere
    (the interpreter's CPU runs) the same rounded operands in a float32 matmul."""
    if not a.is_cuda:
        return a.float() @ b.float()
    batch = a.shape[:-2]
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
    return out.reshape(*batch, *out.shape[-2:])


class _Mm16(torch.autograd.Function):
    """a @ b (float32) with both operands, and in the backward the output gradient, rounded to a
    16-bit type first: FLA's chunk kernels' precision (16-bit dot operands, float32 sums)."""

    @staticmethod
    def forward(ctx, a, b, dtype: torch.dtype):
        a, b = a.to(dtype), b.to(dtype)
        ctx.save_for_backward(a, b)
        return _rounded_mm(a, b)

    @staticmethod
    def backward(ctx, do):
        a, b = ctx.saved_tensors
        do = do.to(a.dtype)
        da = _rounded_mm(do, b.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        db = _rounded_mm(a.transpose(-1, -2), do) if ctx.needs_input_grad[1] else None
        return da, db, None


def _mm(a: torch.Tensor, b: torch.Tensor, operands: torch.dtype) -> torch.Tensor:
    """Batched a @ b of float32 tensors, in float32 or with 16-bit ``operands`` (:class:`_Mm16`)."""
    return a @ b if operands == torch.float32 else _Mm16.apply(a, b, operands)


def _operands(dtype: torch.dtype) -> torch.dtype:
    """Dot operand type of the chunk matmuls and the tree kernels for inputs of ``dtype``."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def gated_delta_rule(q, k, v, g, beta, scale: float, initial_state, output_final_state: bool, cu_seqlens,
                     chunk_size: int = 64):
    """Gated DeltaNet (or DeltaNet with g=None), chunk form; arguments as :func:`hippolm.ops.gated_delta_rule`."""
    B, T = q.shape[:2]
    C = chunk_size if chunk_size in (16, 32, 64) else 64
    bounds, _, (qs, ks, vs, gs, bs) = _padded([q, k, v, g, beta], T, cu_seqlens, B, C)
    op, prec = _operands(q.dtype), _precision(q.dtype)
    N, length, H = qs.shape[:3]
    if gs is None:  # DeltaNet: no decay
        gs = qs.new_zeros(N, length, H, dtype=torch.float32)
    ones = qs.new_ones(1, 1, 1, 1, dtype=torch.float32).expand(N, length, H, C.bit_length())  # every level 1
    # o = (q gamma) S + attn v_new with v_new = u - w S: the chunk's own part attn mix v plus qw S
    w, u, kd, qw, ge, o, _ = ChunkParts.apply(qs.to(op), ks.to(op), vs.to(op), gs, bs, ones, scale, C, False, prec,
                                              torch.float32)
    # float32 factors: the scan's dots take float32 values and states (TF32 for 16-bit inputs)
    h, _, final = _Scan.apply(w.float(), u.float(), kd.float(), ge, initial_state, prec)
    o = o + _mm(qw.float(), h, op).permute(0, 2, 3, 1, 4).reshape(o.shape)  # [N, length, H, V]
    o = torch.cat([o[i, : e - s] for i, (_, s, e) in enumerate(bounds)])[None] if cu_seqlens is not None else o[:, :T]
    return o.to(q.dtype), (final if output_final_state else None)


def _final_slots(w, u, kd, ge, mix, vs, key_level, L: int, prec: str) -> torch.Tensor:
    """Final slots [N, H, L, K, V]: slot l holds the writes of the keys at level l seen from each
    sequence's last token, carried to it (factors [N, H, n, C, *] of the padded sequences, vs [N, n * C,
    H, V], key_level [N, n * C], -1 where no key).

    Q_c, the transitions of the chunks after chunk c, come from one scan from the identity over the
    chunks in reverse with w and kd swapped (it multiplies by ge I - w^T kd, the transposed transition);
    chunk c's writes reach the end as (kd_c Q_c^T)^T u_c. Every chunk before a sequence's last lies
    in one level; the last chunk's keys (levels 0..log2 C) are split by level through its masked values.
    Work and memory of a [K, K] state scan, not of one [K, V] scan per level."""
    N, H, n, C, K = w.shape
    V = u.shape[-1]
    eye = torch.eye(K, device=w.device).expand(N, H, K, K)
    qt, _, _ = _Scan.apply(kd.float().flip(2), torch.zeros_like(w, dtype=torch.float32), w.float().flip(2),
                           ge.flip(2), eye, prec)
    kq = kd.float() @ qt.flip(2)  # [N, H, n, C, K]: chunk c's keys carried to the end
    levels = key_level.view(N, n, C)
    has_last = (levels == 0).any(2)  # [N, n]: the chunk holding the sequence's last token
    whole = levels.amax(2)  # [N, n]: the level of a chunk before the last (-1: no key)
    onehot = torch.nn.functional.one_hot(whole.clamp(0, L - 1), L) * ((whole >= 0) & ~has_last)[..., None]
    slots = torch.einsum("nhckv,ncl->nhlkv", kq.transpose(-1, -2) @ u.float(), onehot.float())
    idx = has_last.float().argmax(1)  # [N] (0 for an empty sequence: its keys are all masked out)
    rows = torch.arange(N, device=w.device)
    lo = min(L, C.bit_length())  # the last chunk's levels
    mask = (levels[rows, idx][..., None] == torch.arange(lo, device=w.device)).float()  # [N, C, lo]
    vl = reference.to_blocks(vs.float(), C)[rows, :, idx]  # [N, H, C, V]
    vm = (vl[..., None, :] * mask[:, None, :, :, None]).reshape(N, H, C, lo * V)
    ends = kq[rows, :, idx].transpose(-1, -2) @ (mix[rows, :, idx] @ vm)  # [N, H, K, lo * V]
    return slots + torch.nn.functional.pad(ends.view(N, H, K, lo, V).permute(0, 1, 3, 2, 4),
                                           (0, 0, 0, 0, 0, L - lo))


class Carry(NamedTuple):
    """The old slots of sequences that continue (built by triton_backend from a LogLinearState): each
    is one aligned block whose keys sit at one level for every later query."""

    slots: torch.Tensor  # [N, H, G, K, V] the blocks' states at the continuation's start
    coef: torch.Tensor  # [N, length, H, G] each position's read weight of each block (lam at its level; 0: none)
    key_level: torch.Tensor  # [N, length] each position's key level seen from the last query (-1: none)
    route: torch.Tensor  # [N, G, L] one-hot: the level each block takes in the final slots (0: empty)


def loglinear_gated_delta_rule(q, k, v, g, beta, lam, scale: float, output_final_state: bool, cu_seqlens,
                               chunk_size: int = 64, carry: Carry | None = None):
    """Log-linear Gated DeltaNet, sequences starting at position 0 (with ``carry``: dense sequences laid
    out by triton_backend to continue old slots); arguments as :func:`hippolm.ops.loglinear_gated_delta_rule`.
    Returns (o, final slots [N, H, L, K, V] or None, ends).

    Intra-chunk (:class:`ChunkParts`, fused kernels): the chunk's delta-rule attention matrix
    ``attn @ mix`` times the level weights, and the WY factors the chunk levels take.
    Chunk levels (:class:`_LevelReads`): through a tree of block summaries
    (:mod:`hippolm.ops.triton_gdn_tree`: per aligned block of 2^h chunks its transition and carried
    writes; chunk i reads the blocks of its set bits, weighted by lam at level log2(C)+1+j), forward
    and backward. Final slots: see :func:`_final_slots`.
    Old slots (``carry``): a block S is read by query t as lam q_t^T A S, A the new tokens' transitions
    up to t; with P_c the product of the transitions before chunk c (one scan from the identity, u = 0)
    that is lam (qw P_c) S, one query per position for every block; the final slots add P S, routed.
    """
    B, T, H, K = q.shape
    L = lam.shape[-1]
    C = chunk_size if chunk_size in (16, 32, 64) else 64
    CB = C.bit_length() - 1
    coef = None if carry is None else carry.coef
    bounds, length, (qs, ks, vs, gs, bs, ls, coef) = _padded([q, k, v, g, beta, lam, coef], T, cu_seqlens, B, C)
    lengths = [e - s for _, s, e in bounds]
    op = _operands(q.dtype)
    prec = _precision(q.dtype)
    w, u, kd, qw, ge, o, mix = ChunkParts.apply(qs.to(op), ks.to(op), vs.to(op), gs, bs, ls, scale, C,
                                                output_final_state, prec, q.dtype)
    N, _, n = w.shape[:3]
    J = max(0, min((n - 1).bit_length(), L - CB - 1))  # chunk levels that some chunk reads
    if J:  # a read of state S in chunk i is lam_j * (qw_i S)
        lamb = reference.to_blocks(ls.float(), C)[..., CB + 1 : CB + 1 + J]  # [N, H, n, C, J]
        o = _LevelReads.apply(o, w, u, kd, ge, qw, lamb, prec, op)  # [N, n * C, H, V]
    if carry is not None:
        P, _, P_end = _Scan.apply(w.float(), torch.zeros_like(w, dtype=torch.float32), kd.float(), ge,
                                  torch.eye(K, device=q.device).expand(N, H, K, K), prec)
        x = (qw.float() @ P).reshape(N, H, n * C, K)  # each query carried back to the continuation's start
        wts = coef.float().permute(0, 2, 1, 3)  # [N, H, n * C, G]
        olds = carry.slots.float()
        o_old = sum((x * wts[..., i, None]) @ olds[:, :, i] for i in range(olds.shape[2]))
        o = (o.float() + o_old.transpose(1, 2)).to(q.dtype)
    o = torch.cat([o[i, :ln] for i, ln in enumerate(lengths)])[None] if cu_seqlens is not None else o[:, :T]
    if not output_final_state:
        return o, None, lengths
    if carry is None:  # each key's level seen from its sequence's last token (-1: none)
        pos = torch.arange(length, device=q.device)
        last = torch.tensor(lengths, device=q.device)[:, None] - 1
        key_level = bit_length((last ^ pos[None]).clamp_min(0))
        key_level = torch.where(pos[None] <= last, key_level, -1)  # [N, length]
    else:
        L = carry.route.shape[-1]
        key_level = torch.nn.functional.pad(carry.key_level, (0, length - carry.key_level.shape[1]), value=-1)
    slots = _final_slots(w, u, kd, ge, mix, vs, key_level, L, prec)
    if carry is not None:  # the old blocks carried through every new token, each to its level
        carried = torch.einsum("nhjk,nhgkv->nhgjv", P_end, olds)
        slots = slots + torch.einsum("nhgkv,ngl->nhlkv", carried, carry.route.to(carried.dtype))
    return o, slots.contiguous(), lengths
