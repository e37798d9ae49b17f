"""Gated DeltaNet chunk form for float32 training on CUDA (FLA's chunk kernels compute in TF32),
where FLA is missing, and log-linear Gated DeltaNet: the chunk-parallel parts (decay masks, the WY /
UT transform, the chunk's own output) in the fused kernels of :mod:`.triton_gdn_chunk`; the
sequential part, the inter-chunk state recurrence, a Triton scan with a hand-written reverse-scan
backward (linear) or the level kernels below (log-linear).

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
from .triton_gdn_tree import _do_row0, _key_block, tree_backward, tree_reads


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


@triton.jit
def _group(n, NBH, j0, top, V, NV, BV: tl.constexpr, NL: tl.constexpr, ADJ: tl.constexpr):
    """This program's part of a group of chunk levels j0..j0+NL-1 (segment * NBH + sequence-head on
    program axis 0, V tile on axis 1; ADJ: both on axis 0, the NV V tiles of a segment adjacent, so
    they run at once and can share their loads of w, kd, qw through L2): sequence-head, first and end
    chunk of its segment of 2^(top+1) chunks (top: the group's highest level), the V tile, and per
    column of its [K, NL * BV] state tile (level l's BV columns side by side) the chunk level, the V
    column, and whether both exist (a level above ``top`` belongs to another group)."""
    if ADJ:
        pid, iv = tl.program_id(0) // NV, tl.program_id(0) % NV
    else:
        pid, iv = tl.program_id(0), tl.program_id(1)
    s = (pid // NBH) * (2 << top)
    cols = tl.arange(0, NL * BV)
    jl = j0 + cols // BV
    vcol = iv * BV + cols % BV
    return (pid % NBH).to(tl.int64), s, tl.minimum(s + (2 << top), n), iv, jl, vcol, (jl <= top) & (vcol < V)


@triton.jit
def _fold(x, C: tl.constexpr, NL: tl.constexpr, BV: tl.constexpr):
    """[C, NL * BV] -> [C, BV]: the levels' columns added up (no size-1 reshape for one level)."""
    if NL == 1:
        return x
    else:
        return tl.sum(tl.reshape(x, (C, NL, BV)), axis=1)


@triton.jit
def _level_fwd(w_ptr, u_ptr, kd_ptr, ge_ptr, qw_ptr, lam_ptr, o0_ptr, o_ptr, n, NBH, K, V, NV, J, j0, top,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NL: tl.constexpr, FIRST: tl.constexpr,
               HAS_O0: tl.constexpr, ADJ: tl.constexpr, PREC: tl.constexpr):
    """Chunk levels j0..j0+NL-1 of log-linear Gated DeltaNet for one segment, (sequence, head) and V
    tile, all levels in one pass with their states side by side: level j restarts every 2^(j+1)
    chunks; a chunk with bit j clear writes into it, one with bit j set reads ``lam_j * (qw_i S_i)``
    (added into o: one launch per group, so no two programs touch the same rows) and only evolves it.
    The levels share every load of w, kd and qw, and one dot serves them all. The first group of a
    lane (FIRST) writes every row of o instead of adding: the reads onto ``o0`` (HAS_O0) or zero, so
    o needs no zero fill and the chunks' own output no separate add."""
    bh, s, e, iv, jl, vcol, live = _group(n, NBH, j0, top, V, NV, BV, NL, ADJ)
    _, _, tile_ck, mck, tile_cv, mcv, _, _ = _tiles(K, V, iv, C, BK, BV)
    cc = tl.arange(0, C)
    tile_cw = cc[:, None] * V + vcol[None, :]  # u's columns, repeated for every level
    S = tl.zeros((BK, NL * BV), dtype=tl.float32)
    for i in range(s, e):
        base = bh * n + i
        S = tl.where(((i & ((2 << jl) - 1)) == 0)[None, :], 0.0, S)
        reads = ((i >> jl) & 1) == 1
        optr = o_ptr + base * (C * V) + tile_cv
        if FIRST:  # what the reads add to
            if HAS_O0:
                prev = tl.load(o0_ptr + base * (C * V) + tile_cv, mask=mcv, other=0)
            else:
                prev = tl.zeros((C, BV), dtype=tl.float32)
        if ((i >> j0) & ((2 << (top - j0)) - 1)) != 0:  # some level of the group reads chunk i
            qw = tl.load(qw_ptr + base * (C * K) + tile_ck, mask=mck, other=0)
            lam = tl.load(lam_ptr + (base * C + cc)[:, None] * J + jl[None, :], mask=(reads & live)[None, :], other=0)
            r = lam * tl.dot(qw, S.to(qw.dtype), input_precision=PREC)
            if not FIRST:
                prev = tl.load(optr, mask=mcv, other=0)
            tl.store(optr, prev + _fold(r, C, NL, BV), mask=mcv)
        elif FIRST:
            tl.store(optr, prev, mask=mcv)
        S = _write(w_ptr, u_ptr, kd_ptr, ge_ptr, base, S, tile_ck, mck, tile_cw, (live & ~reads)[None, :],
                   K, V, C, PREC)[0]


@triton.jit
def _store_levels(h_ptr, base, x, tile_h, mh, J, j0, top, K, V, iv, BK: tl.constexpr, BV: tl.constexpr,
                  NL: tl.constexpr, BLOCK_STORE: tl.constexpr):
    """Chunk ``base``'s [K, NL * BV] tile of levels j0..top (BV columns each) into its [J, K, V] block of
    ``h``: through the precomputed offsets ``tile_h`` (masked by ``mh``), or (BLOCK_STORE) as an
    [NL, K, BV] block clipped at level top (no [K, NL * BV] offset tile kept live through the scan)."""
    if BLOCK_STORE:
        ptr = tl.make_block_ptr(h_ptr + base * J * K * V, shape=(top + 1, K, V), strides=(K * V, V, 1),
                                offsets=(j0, 0, iv * BV), block_shape=(NL, BK, BV), order=(2, 1, 0))
        tl.store(ptr, tl.permute(tl.reshape(x, (BK, NL, BV)), (1, 0, 2)), boundary_check=(0, 1, 2))
    else:
        tl.store(h_ptr + base * J * K * V + tile_h, x, mask=mh)


@triton.jit
def _level_bwd(w_ptr, u_ptr, kd_ptr, ge_ptr, qw_ptr, lam_ptr, do_ptr, hs_ptr, hd_ptr, n, NBH, K, V, NV, J, j0,
               top, H, sB, sH, sT, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NL: tl.constexpr,
               BLOCK_STORE: tl.constexpr, ADJ: tl.constexpr, PREC: tl.constexpr):
    """Backward scans of :func:`_level_fwd` for one segment and V tile, one of two independent scans
    per program (program axis 2, or 1 with ADJ): 0 recomputes the segment's states into ``hs`` (the state before
    each chunk), 1 stores into ``hd`` the gradient of the state after each chunk by a reverse scan
    (which needs no state). Both scratches are [N*H*n, J, K, V] in the operand type;
    :func:`_level_grads` turns them into the gradients, all chunks and levels in parallel, so the
    sequential part does 2 or 3 dots per chunk and no partial sums; the two scans run side by side
    (twice the programs, half the sequential steps: the top levels' few programs are latency-bound)."""
    bh, s, e, iv, jl, vcol, live = _group(n, NBH, j0, top, V, NV, BV, NL, ADJ)
    _, _, tile_ck, mck, _, _, _, _ = _tiles(K, V, iv, C, BK, BV)
    kk = tl.arange(0, BK)
    cc = tl.arange(0, C)
    tile_cw = cc[:, None] * V + vcol[None, :]  # u's columns, repeated for every level
    tile_h = (jl[None, :] * K + kk[:, None]) * V + vcol[None, :]  # [BK, NL * BV] of a chunk's [J, K, V]
    mh = (kk[:, None] < K) & live[None, :]
    dt = w_ptr.dtype.element_ty
    if tl.program_id(1 if ADJ else 2) == 0:
        S = tl.zeros((BK, NL * BV), dtype=tl.float32)
        for i in range(s, e):
            base = bh * n + i
            S = tl.where(((i & ((2 << jl) - 1)) == 0)[None, :], 0.0, S)
            _store_levels(hs_ptr, base, S.to(dt), tile_h, mh, J, j0, top, K, V, iv, BK, BV, NL, BLOCK_STORE)
            writes = live & (((i >> jl) & 1) == 0)
            S = _write(w_ptr, u_ptr, kd_ptr, ge_ptr, base, S, tile_ck, mck, tile_cw, writes[None, :],
                       K, V, C, PREC)[0]
    else:
        dS = tl.zeros((BK, NL * BV), dtype=tl.float32)  # gradient of the state after chunk i
        for ii in range(e - s):
            i = e - 1 - ii
            base = bh * n + i
            _store_levels(hd_ptr, base, dS.to(dt), tile_h, mh, J, j0, top, K, V, iv, BK, BV, NL, BLOCK_STORE)
            w = tl.load(w_ptr + base * (C * K) + tile_ck, mask=mck, other=0)
            kd = tl.load(kd_ptr + base * (C * K) + tile_ck, mask=mck, other=0)
            dvn = tl.dot(kd, dS.to(dt), input_precision=PREC)  # [C, NL * BV]
            # dot(a, b, acc) adds into the accumulator's registers (no [K, NL * BV] temporary)
            dS = tl.dot(tl.trans(w), (-dvn).to(dt), tl.load(ge_ptr + base) * dS, input_precision=PREC)
            if ((i >> j0) & ((2 << (top - j0)) - 1)) != 0:  # some level reads: o_i += sum_j lam_j * (qw_i S_i^(j))
                qw = tl.load(qw_ptr + base * (C * K) + tile_ck, mask=mck, other=0)
                rmask = ((((i >> jl) & 1) == 1) & live)[None, :]
                lam = tl.load(lam_ptr + (base * C + cc)[:, None] * J + jl[None, :], mask=rmask, other=0)
                do = tl.load(do_ptr + _do_row0(bh, i, H, sB, sH, sT, C) + cc[:, None] * sT + vcol[None, :],
                             mask=rmask, other=0).to(tl.float32)  # do's columns, per level
                dS = tl.dot(tl.trans(qw), (lam * do).to(dt), dS, input_precision=PREC)
            dS = tl.where(((i & ((2 << jl) - 1)) == 0)[None, :], 0.0, dS)  # a restart: nothing flows further back


@triton.jit
def _level_grads(w_ptr, u_ptr, kd_ptr, qw_ptr, lam_ptr, do_ptr, hs_ptr, hd_ptr, H, sB, sH, sT,
                 du_ptr, dw_ptr, dkd_ptr, dqw_ptr, dge_ptr, dlam_ptr, n, K, V, J,
                 C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, JP: tl.constexpr, UNIFORM: tl.constexpr,
                 PREC: tl.constexpr):
    """Gradients of every chunk level's part of one chunk (program axis 0: sequence-head * n + chunk)
    from the states S_j before it and the gradients dS_j of the states after it (:func:`_level_bwd`).
    Per level, v_new_j = u [j writes] - w S_j and, where it reads, r_j = qw S_j. The write-side
    gradients summed over levels factor through two sums, M = sum_j dS_j S_j^T [K, K] (one long
    product whose reduction runs over every level's V columns) and D = sum over writing levels of dS_j:

        dw = -kd M,   dkd = u D^T - w M^T,   du = kd D,   dge = trace(M),

    and where level j reads, dlam_j = rowsum(do * r_j), dqw += (lam_j do) S_j^T. dkd is built
    transposed, so only loaded tiles are transposed (FLA #640), and written through transposed offsets."""
    base = tl.program_id(0).to(tl.int64)
    i = tl.program_id(0) % n
    kk = tl.arange(0, BK)
    cc = tl.arange(0, C)
    jj = tl.arange(0, JP)
    tile_ck = cc[:, None] * K + kk[None, :]
    mck = kk[None, :] < K
    dt = w_ptr.dtype.element_ty
    kd = tl.load(kd_ptr + base * (C * K) + tile_ck, mask=mck, other=0)
    qw = tl.load(qw_ptr + base * (C * K) + tile_ck, mask=mck, other=0)
    M = tl.zeros((BK, BK), dtype=tl.float32)
    dkdT = tl.zeros((BK, C), dtype=tl.float32)  # dkd^T
    dqw = tl.zeros((C, BK), dtype=tl.float32)
    dlam = tl.zeros((C, JP), dtype=tl.float32)
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        tile_cv = cc[:, None] * V + vv[None, :]
        mcv = vv[None, :] < V
        tile_kv = kk[:, None] * V + vv[None, :]
        mkv = (kk[:, None] < K) & (vv[None, :] < V)
        u = tl.load(u_ptr + base * (C * V) + tile_cv, mask=mcv, other=0)
        do = tl.load(do_ptr + _do_row0(base // n, i, H, sB, sH, sT, C) + cc[:, None] * sT + vv[None, :], mask=mcv,
                     other=0).to(tl.float32)
        D = tl.zeros((BK, BV), dtype=tl.float32)
        for j in range(J):
            off = (base * J + j) * (K * V)
            Sh = tl.load(hs_ptr + off + tile_kv, mask=mkv, other=0)
            dS = tl.load(hd_ptr + off + tile_kv, mask=mkv, other=0)
            # dot(a, b, acc) adds into the accumulator's registers (no [K, K] temporary)
            M = tl.dot(dS, tl.trans(Sh), M, input_precision=PREC)
            if UNIFORM:  # every level through the same ops, the reads' terms masked: a loop body
                # without branches (for the software pipeliner), at the cost of the writers' idle dots
                reads = ((i >> j) & 1) == 1
                D += tl.where(reads, 0.0, dS.to(tl.float32))
                lam = tl.load(lam_ptr + (base * C + cc) * J + j, mask=(cc < C) & reads, other=0)
                r = tl.dot(qw, Sh, input_precision=PREC)
                dlam += tl.where((jj[None, :] == j) & reads, tl.sum(do * r, axis=1)[:, None], 0.0)
                dqw = tl.dot((lam[:, None] * do).to(dt), tl.trans(Sh), dqw, input_precision=PREC)
            elif ((i >> j) & 1) == 0:  # level j writes chunk i
                D += dS.to(tl.float32)
            else:  # it reads it
                lam = tl.load(lam_ptr + (base * C + cc) * J + j)
                r = tl.dot(qw, Sh, input_precision=PREC)
                dlam += tl.where(jj[None, :] == j, tl.sum(do * r, axis=1)[:, None], 0.0)
                dqw = tl.dot((lam[:, None] * do).to(dt), tl.trans(Sh), dqw, input_precision=PREC)
        Dc = D.to(dt)
        tl.store(du_ptr + base * (C * V) + tile_cv, tl.dot(kd, Dc, input_precision=PREC), mask=mcv)
        dkdT = tl.dot(Dc, tl.trans(u), dkdT, input_precision=PREC)
    Mc = M.to(dt)
    # -w negated in float32 (the interpreter keeps bf16 as raw bits)
    wn = (-tl.load(w_ptr + base * (C * K) + tile_ck, mask=mck, other=0).to(tl.float32)).to(dt)
    dkdT = tl.dot(Mc, tl.trans(wn), dkdT, input_precision=PREC)
    tl.store(dkd_ptr + base * (C * K) + cc[None, :] * K + kk[:, None], dkdT, mask=kk[:, None] < K)
    dw = tl.dot(kd, Mc, input_precision=PREC)
    tl.store(dw_ptr + base * (C * K) + tile_ck, -dw, mask=mck)
    tl.store(dqw_ptr + base * (C * K) + tile_ck, dqw, mask=mck)
    tl.store(dge_ptr + base, tl.sum(tl.sum(tl.where(kk[:, None] == kk[None, :], M, 0.0), axis=1), axis=0))
    tl.store(dlam_ptr + (base * C + cc)[:, None] * J + jj[None, :], dlam, mask=jj[None, :] < J)


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


# Levels per program and V columns per level of the level kernels, per pass and operand type: a
# state tile of NL * BV columns. The top levels ("_top": the top NL of them) run in their own lane,
# concurrently with the others: one segment of up to every chunk each, so few programs, and narrower
# tiles give more. float32 operands take smaller tiles (an A100's 164 KB of shared memory; compiled
# sizes in tests/test_kernel_compile.py) and the same in both lanes. Timings (benchmarks/level_timing.py,
# H100, 64k tokens, bf16, all level kernels fwd+bwd; level_timing_h100_split_bwd.json): 28.2 ms as
# here; with backward tiles 2 x 128 36.0, 4 x 64 37.4, top 2 x 32 28.9; forward 4 x 64 32.7 (16 warps 38.0).
# Since then (level_timing_h100_fwd_tiles.json): forward 4 x 16 with 4 warps, 9.89 -> 6.77 ms forward,
# 29.2 -> 26.1 fwd+bwd (4 x 32 with 4 warps 12.6; 2 x 16 11.6; 3 stages 9.8; 1 stage with 4 warps and
# 16 columns computes WRONG results on the H100, Triton 3.6, so 4 warps only where 2 stages run).
LEVEL_TILES = {"fwd": (4, 16), "bwd": (2, 64), "fwd_top": (2, 32), "bwd_top": (2, 64),
               "fwd_fp32": (2, 32), "bwd_fp32": (1, 32)}
# Pipeline stages of the 16-bit kernels on Hopper and warps per program (H100, 64k tokens: the
# backward scans with 2 stages 54.3 ms for all level kernels, with 1 56.9; level_timing.py).
LEVEL_STAGES = {"fwd": 2, "bwd": 2}
LEVEL_WARPS = {"fwd": 4, "bwd": 8}  # with 1 stage (float32, or not Hopper): 8
# The gradient kernel (_level_grads) per dot precision: V columns per step and launch options (H100,
# 64k tokens, bf16: 6.55 ms with 64 columns, 8 warps and 2 stages; 17.8 before the factored form;
# level_timing_h100_split_bwd.json, level_timing_h100_unfactored_grads.json).
LEVEL_GRADS = {"tf32": {"BV": 64, "num_warps": 8, "num_stages": 2},
               "ieee": {"BV": 32, "num_warps": 8, "num_stages": 1}}
# 1: the gradient kernel runs every level through the same dots, the reads' terms masked (a loop body
# without branches, which Triton can pipeline); 0: a branch per level. Not yet timed.
LEVEL_GRADS_UNIFORM = 0


# The backward scans store each chunk's states (and state gradients) of their levels: 0 through an
# offset tile made once and kept live through the scan (sm_90: 112 bytes of spill stack), 1 as a block
# (a block pointer clipped at the group's top level). Not yet timed.
LEVEL_BLOCK_STORE = 0


# The level kernels' grid: 0 segments x sequence-heads on axis 0 and V tiles on axis 1 (a segment's
# V tiles run far apart, each loading w, kd, qw from memory); 1 both on axis 0 with a segment's V
# tiles adjacent (they run at once and can share those loads through L2). Timed with forward tiles
# 4 x 32 (4 V tiles): no difference (level_timing_h100_adjacent.json); not yet with 4 x 16 (8 V tiles,
# where level_bytes.py counts 6.3 of the lower forward group's 8.0 GB as such re-reads).
LEVEL_V_ADJACENT = 0


def _level_grid(programs: int, NV: int, scans: int = 1) -> tuple[int, ...]:
    """Grid of a level kernel over ``programs`` segment x sequence-head programs, NV V tiles and
    (backward) ``scans`` scans per program, as LEVEL_V_ADJACENT says."""
    grid = (programs * NV,) if LEVEL_V_ADJACENT else (programs, NV)
    return (*grid, scans) if scans > 1 else grid


# The level (or tree) backward reads the output gradient do: 0 (default) do itself, in its own type and
# [N, T, H, V] layout (rows H * V apart); 1 a float32 copy in [N, H, T, V] layout (twice the bytes of a 16-bit
# do at every read: ~1.6 GB more per fwd+bwd at 64k tokens for the level scans, as much for the tree: 27.4 ->
# 29.0 GB, level_bytes.py), made for the chunks' own output until that took do as it comes. Tree backward
# on the H100, with that copy made either way: fwd+bwd 28.99 vs 29.11 ms at 64k, 26.55 vs 26.54 at 8k
# (flag_timing_h100_llgdn_tree_do_copy.json); level scans untimed.
LEVEL_DO_COPY = 0


# 1 (default): the forward reads the chunk levels through a tree of block summaries (triton_gdn_tree: no
# sequential scan, 11.6 instead of 19.7 GB at 64k tokens by level_bytes.py's count); 0: the level scans.
# H100, bf16, H = 16, d = 128, 65,536 tokens (flag_timing_h100_llgdn_tree_fwd.json, before the tiles
# were made adjacent): forward 11.13 -> 8.88 ms at 64k, 11.82 -> 8.63 at 8k.
LEVEL_TREE_FWD = 1
# 1 (default): the backward through the tree too (triton_gdn_tree.tree_backward: per chunk, per height
# top down, per leaf; no per-level scratch states); 0: the level scans. With the tree forward, fwd+bwd
# 36.71 -> 28.67 ms at 64k, 31.60 -> 25.79 at 8k (flag_timing_h100_llgdn_tree_bwd_fused.json).
LEVEL_TREE_BWD = 1
# With both: 1 keeps the forward's tree for the backward (2.1 GB more held per call at 64k tokens,
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


def _level_launch(prec: str, major: int, backward: bool) -> dict:
    """Launch options of the level scans on a GPU of compute capability ``major``: Hopper's shared
    memory holds more than one stage of the 16-bit tiles (LEVEL_STAGES), not of float32 tiles."""
    which = "bwd" if backward else "fwd"
    stages = _stages(LEVEL_STAGES[which], prec, major)
    return {"num_warps": LEVEL_WARPS[which] if stages > 1 else 8, "num_stages": stages}


def _grads_launch(prec: str, major: int) -> dict:
    """Launch options of the gradient kernel (LEVEL_GRADS), staged as :func:`_level_launch`."""
    cfg = LEVEL_GRADS[prec]
    return {"num_warps": cfg["num_warps"], "num_stages": _stages(cfg["num_stages"], prec, major)}


def _stages(stages: int, prec: str, major: int) -> int:
    return stages if prec == "tf32" and major >= 9 else 1


class _Lane(NamedTuple):
    """Tiles and level groups (first level, top level, segments of 2^(top+1) chunks) of one lane."""

    BK: int
    BV: int
    NL: int
    NV: int
    groups: list


def _level_lanes(n: int, J: int, K: int, V: int, which: str, prec: str) -> list[_Lane]:
    """The lanes of pass ``which`` ("fwd" or "bwd") over chunk levels 0..J-1 of n chunks: the levels
    below the top ones NL at a time, then the top NL levels in one group (each lane left out if empty)."""
    key = which if prec == "tf32" else which + "_fp32"
    main, top = LEVEL_TILES[key], LEVEL_TILES[key if prec != "tf32" else which + "_top"]
    split = max(0, J - top[0])
    BK = _key_block(K)
    lanes = []
    for lo, hi, (NL, BV) in ((0, split, main), (split, J, top)):
        BV = min(BV, max(16, triton.next_power_of_2(V)))
        groups = [(j0, min(j0 + NL, hi) - 1, -(-n // (2 << (min(j0 + NL, hi) - 1)))) for j0 in range(lo, hi, NL)]
        if groups:
            lanes.append(_Lane(BK, BV, NL, -(-V // BV), groups))
    return lanes


# 1: the top lane on a side stream, concurrently with the others; 0: the lanes one after the other
# (for timing what the concurrency gains: the top lane's programs take SMs from the lower levels').
LEVEL_SIDE_STREAM = 1

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}  # one per GPU (a fresh one per call could be
# any stream of PyTorch's pool, e.g. one that DDP's all-reduce holds)


def _in_lanes(lanes: list[_Lane], launch, buffers, device: torch.device) -> list:
    """Runs ``launch(lane, group, bufs)`` for every group of every lane, each lane into its own
    ``buffers(lane)`` where groups add into the same rows (no two lanes may share such buffers at
    once; None where they write disjoint places); returns the buffer sets. On CUDA the top lane
    runs on a side stream, concurrently with the others (its few long scans would leave most of the
    GPU idle)."""
    sets = [buffers(lane) for lane in lanes]
    if device.type != "cuda" or len(lanes) < 2 or not LEVEL_SIDE_STREAM:
        for lane, bufs in zip(lanes, sets, strict=True):
            for group in lane.groups:
                launch(lane, group, bufs)
        return sets
    main = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.setdefault(device, torch.cuda.Stream(device))
    side.wait_stream(main)  # the inputs and the zeroed buffers
    try:
        with torch.cuda.stream(side):
            for group in lanes[1].groups:
                launch(lanes[1], group, sets[1])
        for group in lanes[0].groups:
            launch(lanes[0], group, sets[0])
    finally:  # also on a failed launch: nothing the side stream uses may be freed before it is done
        main.wait_stream(side)
    return sets


class _LevelReads(torch.autograd.Function):
    """Every chunk level's read of log-linear Gated DeltaNet, summed and added to o0: (o0 [N, n * C, H, V]
    in the output's type: the chunks' own output, w, u, kd, qw [N, H, n, C, *], ge [N, H, n],
    lam [N, H, n, C, J]: the weight of chunk level j) -> o, o0's shape and type (the reads, the layout
    change and the cast in one pass). o0's gradient is o's as it comes: no copy (a float32 copy of
    do in o0's old [N, H, n, C, V] layout took 0.56 ms of 18.8 at 8k x 8 on the H100,
    llgdn_profile_h100_T8192_split.json).
    ``operands``: the type w, u, kd, qw and the saved states take in the kernels (16-bit for 16-bit
    inputs, as FLA's chunk kernels: half the bytes and full-rate tensor cores; the states and
    in-kernel sums stay float32). The backward scans the levels by groups as the forward, into
    scratch states and state gradients, then computes every gradient in one parallel kernel."""

    @staticmethod
    def forward(ctx, o0, w, u, kd, ge, qw, lam, prec: str, operands: torch.dtype):
        N, H, n, C, K = w.shape
        V, J = u.shape[-1], lam.shape[-1]
        w, u, kd, qw = (x.to(operands).contiguous() for x in (w, u, kd, qw))
        ge, lam, o0, out_dtype = ge.contiguous(), lam.contiguous(), o0.contiguous(), o0.dtype
        ctx.save_for_backward(w, u, kd, ge, qw, lam)
        ctx.prec = prec
        ctx.tree = None
        if LEVEL_TREE_FWD:
            keep = LEVEL_TREE_BWD and LEVEL_TREE_SAVE
            leaves = LEVEL_TREE_LEAVES_BWD if keep else LEVEL_TREE_LEAVES_FWD
            out, tree = tree_reads(o0, w, u, kd, ge, qw, lam, prec, leaves=bool(leaves))
            if keep:
                ctx.tree = tree  # a buffer of this call's, read once by its backward
            return out
        o0 = o0.float().view(N, n, C, H, V).permute(0, 3, 1, 2, 4).contiguous()  # the level scans' layout
        opts = _level_launch(prec, _major(w.device), False)
        lanes = _level_lanes(n, J, K, V, "fwd", prec)

        def launch(lane, group, o):  # the first group of a lane writes every row: on o0 in the first lane
            j0, top, nseg = group
            first = group == lane.groups[0]
            _level_fwd[_level_grid(N * H * nseg, lane.NV)](w, u, kd, ge, qw, lam, o0, o, n, N * H, K, V, lane.NV, J,
                                                          j0, top, C=C, BK=lane.BK, BV=lane.BV, NL=lane.NL,
                                                          FIRST=first, HAS_O0=first and lane is lanes[0],
                                                          ADJ=bool(LEVEL_V_ADJACENT), PREC=prec, **opts)

        sets = _in_lanes(lanes, launch, lambda lane: torch.empty_like(o0), w.device)
        out = w.new_empty(N, n, C, H, V, dtype=out_dtype)
        if len(sets) == 1:
            out.permute(0, 3, 1, 2, 4).copy_(sets[0])
        else:
            torch.add(sets[0], sets[1], out=out.permute(0, 3, 1, 2, 4))
        return out.view(N, n * C, H, V)

    @staticmethod
    def backward(ctx, do):
        w, u, kd, ge, qw, lam = ctx.saved_tensors
        N, H, n, C, K = w.shape
        V, J = u.shape[-1], lam.shape[-1]
        do0 = do.contiguous()  # o0's gradient; the level / tree kernels read a float32 copy in the
        # [N, H, n * C, V] layout or do itself (LEVEL_DO_COPY), as the [N, H, n * C, V] view of its layout
        do = (do0.permute(0, 2, 1, 3).float().contiguous() if LEVEL_DO_COPY else do0.permute(0, 2, 1, 3))
        if LEVEL_TREE_BWD:
            tree, ctx.tree = ctx.tree, None
            grads = tree_backward(do, w, u, kd, ge, qw, lam, ctx.prec, tree, leaves=bool(LEVEL_TREE_LEAVES_BWD))
            return do0, *grads, None, None
        opts = _level_launch(ctx.prec, _major(w.device), True)
        do_strides = (H, *do.stride()[:3])

        # the states before and the state gradients after every chunk, every level (operand type)
        hs, hd = (w.new_empty(N, H, n, J, K, V) for _ in range(2))

        def launch(lane, group, _):
            j0, top, nseg = group
            _level_bwd[_level_grid(N * H * nseg, lane.NV, 2)](w, u, kd, ge, qw, lam, do, hs, hd, n, N * H, K, V,
                                                             lane.NV, J, j0, top, *do_strides, C=C, BK=lane.BK,
                                                             BV=lane.BV, NL=lane.NL, BLOCK_STORE=LEVEL_BLOCK_STORE,
                                                             ADJ=bool(LEVEL_V_ADJACENT), PREC=ctx.prec, **opts)

        lanes = _level_lanes(n, J, K, V, "bwd", ctx.prec)
        _in_lanes(lanes, launch, lambda lane: None, w.device)  # the lanes write disjoint levels
        du = torch.empty_like(u)  # in the operand type, as the inputs they are gradients of
        dw, dkd, dqw = (torch.empty_like(w) for _ in range(3))
        dge, dlam = torch.empty_like(ge), torch.empty_like(lam)
        BV = min(LEVEL_GRADS[ctx.prec]["BV"], max(16, triton.next_power_of_2(V)))
        _level_grads[(N * H * n,)](w, u, kd, qw, lam, do, hs, hd, *do_strides, du, dw, dkd, dqw, dge, dlam, n, K, V,
                                   J, C=C, BK=lanes[0].BK, BV=BV, JP=max(2, triton.next_power_of_2(J)),
                                   UNIFORM=bool(LEVEL_GRADS_UNIFORM), PREC=ctx.prec,
                                   **_grads_launch(ctx.prec, _major(w.device)))
        return do0, dw, du, dkd, dge, dqw, dlam, None, None


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
    """Dot operand type of the chunk matmuls and level kernels for inputs of ``dtype``."""
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
    ``attn @ mix`` times the level weights, and the WY factors of the level kernels.
    Chunk levels (:class:`_LevelReads`): by default through a tree of block summaries
    (:mod:`hippolm.ops.triton_gdn_tree`: per aligned block of 2^h chunks its transition and carried
    writes; chunk i reads the blocks of its set bits), forward and backward. With LEVEL_TREE_FWD /
    LEVEL_TREE_BWD = 0, level scans: level j in segments of 2^(j+1) chunks, each its own program;
    the first half writes a state from zero, the second half reads it, weighted by lam at level
    log2(C)+1+j, while it keeps evolving (u = 0): with v_new = -w S the read of chunk i is
    (q gamma - attn w) S, so no per-level state is ever stored in the forward. Final slots: see
    :func:`_final_slots`.
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
