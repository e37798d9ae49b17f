"""Log-linear Gated DeltaNet's chunk-level reads through a tree of block summaries, forward and
backward (the default path of triton_gdn), the Triton form of the chunk reference's
``loglinear._tree_reads``.

Each aligned block of 2^h chunks has a summary M = [T | D] ([K, K + V], operand type): T its
transition (the state at its end = T S + D for the state S at its start) and D its writes carried
to its end. Leaves (chunks): M = [ge I - kd^T w | kd^T u]; a parent from its halves:
M = T_right M_left + [0 | D_right]. Chunk i reads chunk level j (bit j of i set) from the block of
2^j chunks just before ``i >> j << j``, carried to i through the blocks of i's lower set bits: its
set bits from the lowest up, ``o += lam_j (q D); q <- q T``, with q = qw_i. No sequential scan:
every chunk reads in parallel, the tree takes one launch per height; no per-level state per chunk.
The backward (:func:`tree_backward`) runs the same way: per chunk, per height top down, per leaf.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def _do_row0(bh, i, H, sB, sH, sT, C: tl.constexpr):
    """Offset of chunk i's first row of sequence-head ``bh`` in do, whose [N, H, T, V] view has strides
    sB, sH, sT, 1 (the output's own [N, T, H, V] layout, or a [N, H, T, V] copy)."""
    return (bh // H) * sB + (bh % H) * sH + i * C * sT


@triton.jit
def _do_tile(do_ptr, H, sB, sH, sT, bh, i, V, cols, mask, C: tl.constexpr):
    """Chunk i's rows of do in columns ``cols``, float32, through the strides sB, sH, sT of do's
    [N, H, T, V] view (the output's own [N, T, H, V] layout)."""
    cc = tl.arange(0, C)
    offs = _do_row0(bh, i, H, sB, sH, sT, C) + cc[:, None] * sT + cols[None, :]
    return tl.load(do_ptr + offs, mask=mask, other=0).to(tl.float32)


@triton.jit
def _tile_pid(ntile):
    """(program, tile) of a grid whose axis 0 runs ``ntile`` column tiles per program adjacently (they
    run at once and share their common loads through L2)."""
    pid = tl.program_id(0).to(tl.int64)
    return pid // ntile, pid % ntile


@triton.jit
def _factors(w_ptr, u_ptr, c, cols, K, V, C: tl.constexpr, TR: tl.constexpr):
    """[-w | u][:, cols] of chunk c, [C, BN] in the operand type (-w negated in float32), or its
    transpose [BN, C] loaded through transposed offsets if TR (c: the chunk's index in w, u [N * H * n,
    C, *])."""
    cc = tl.arange(0, C)
    is_t = cols < K
    if TR:
        w = tl.load(w_ptr + c * (C * K) + cc[None, :] * K + cols[:, None], mask=is_t[:, None], other=0)
        u = tl.load(u_ptr + c * (C * V) + cc[None, :] * V + (cols - K)[:, None],
                    mask=(~is_t & (cols < K + V))[:, None], other=0)
        x = tl.where(is_t[:, None], -w.to(tl.float32), u.to(tl.float32))
    else:
        w = tl.load(w_ptr + c * (C * K) + cc[:, None] * K + cols[None, :], mask=is_t[None, :], other=0)
        u = tl.load(u_ptr + c * (C * V) + cc[:, None] * V + (cols - K)[None, :],
                    mask=(~is_t & (cols < K + V))[None, :], other=0)
        x = tl.where(is_t[None, :], -w.to(tl.float32), u.to(tl.float32))
    return x.to(w_ptr.dtype.element_ty)


@triton.jit
def _leaf_tile(w_ptr, u_ptr, kd_ptr, ge_ptr, c, cols, K, V, C: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Columns ``cols`` of chunk c's leaf summary [ge I - kd^T w | kd^T u], [BK, BN] float32 (c: the
    chunk's index in w, u, kd [N * H * n, C, *] and ge [N * H * n])."""
    kk = tl.arange(0, BK)
    cc = tl.arange(0, C)
    kd = tl.load(kd_ptr + c * (C * K) + cc[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0)
    x = tl.dot(tl.trans(kd), _factors(w_ptr, u_ptr, c, cols, K, V, C, False), input_precision=PREC)  # [BK, BN]
    return x + tl.where(kk[:, None] == cols[None, :], tl.load(ge_ptr + c), 0.0)


@triton.jit
def _tree_leaves(w_ptr, u_ptr, kd_ptr, ge_ptr, m_ptr, n, NN, K, V, C: tl.constexpr, BK: tl.constexpr,
                 BN: tl.constexpr, PREC: tl.constexpr):
    """One column tile of chunk i's leaf summary (program: sequence-head * n + chunk, its tiles
    adjacent), into node i of height 0."""
    W = K + V
    pid, tile = _tile_pid((W + BN - 1) // BN)
    bh, i = pid // n, pid % n
    kk = tl.arange(0, BK)
    cols = tile * BN + tl.arange(0, BN)
    x = _leaf_tile(w_ptr, u_ptr, kd_ptr, ge_ptr, pid, cols, K, V, C, BK, PREC)
    tl.store(m_ptr + (bh * NN + i) * (K * W) + kk[:, None] * W + cols[None, :], x.to(m_ptr.dtype.element_ty),
             mask=(kk[:, None] < K) & (cols[None, :] < W))


@triton.jit
def _tree_merge_leaves(w_ptr, u_ptr, kd_ptr, ge_ptr, m_ptr, n, n_h, off_h, NN, K, V, C: tl.constexpr,
                       BK: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """One column tile of node m of height 1 made from the factors of chunks 2m (left) and 2m + 1
    (right), no leaf stored (program: sequence-head * n_h + m, its tiles adjacent):
    T_right M_left + [0 | D_right] = ge_r M_left + kd_r^T ([0 | u_r] - w_r M_left)."""
    W = K + V
    pid, tile = _tile_pid((W + BN - 1) // BN)
    bh, m = pid // n_h, pid % n_h
    right = bh * n + 2 * m + 1
    kk = tl.arange(0, BK)
    cc = tl.arange(0, C)
    cols = tile * BN + tl.arange(0, BN)
    dt = w_ptr.dtype.element_ty
    mk = kk[None, :] < K
    m_left = _leaf_tile(w_ptr, u_ptr, kd_ptr, ge_ptr, right - 1, cols, K, V, C, BK, PREC)  # [BK, BN]
    w_r = tl.load(w_ptr + right * (C * K) + cc[:, None] * K + kk[None, :], mask=mk, other=0)
    u_r = tl.load(u_ptr + right * (C * V) + cc[:, None] * V + (cols - K)[None, :],
                  mask=((cols >= K) & (cols < W))[None, :], other=0)
    rhs = u_r.to(tl.float32) - tl.dot(w_r, m_left.to(dt), input_precision=PREC)  # [C, BN]
    kd_r = tl.load(kd_ptr + right * (C * K) + cc[:, None] * K + kk[None, :], mask=mk, other=0)
    x = tl.dot(tl.trans(kd_r), rhs.to(dt), m_left * tl.load(ge_ptr + right), input_precision=PREC)
    tl.store(m_ptr + (bh * NN + off_h + m) * (K * W) + kk[:, None] * W + cols[None, :], x.to(m_ptr.dtype.element_ty),
             mask=(kk[:, None] < K) & (cols[None, :] < W))


@triton.jit
def _tree_merge(m_ptr, n_h, off_prev, off_h, NN, K, V, BK: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """One column tile of node m of a height from nodes 2m (left) and 2m + 1 (right) of the height
    below (program: sequence-head * n_h + m, its tiles adjacent): T_right [T_left | D_left] + [0 | D_right]."""
    W = K + V
    pid, tile = _tile_pid((W + BN - 1) // BN)
    bh, m = pid // n_h, pid % n_h
    kk = tl.arange(0, BK)
    cols = tile * BN + tl.arange(0, BN)
    left = m_ptr + (bh * NN + off_prev + 2 * m) * (K * W)
    right = left + K * W
    mk = kk < K
    t_right = tl.load(right + kk[:, None] * W + kk[None, :], mask=mk[:, None] & mk[None, :], other=0)
    tile = kk[:, None] * W + cols[None, :]
    mt = mk[:, None] & (cols[None, :] < W)
    d_right = tl.load(right + tile, mask=mt & (cols[None, :] >= K), other=0).to(tl.float32)
    x = tl.dot(t_right, tl.load(left + tile, mask=mt, other=0), d_right, input_precision=PREC)
    tl.store(m_ptr + (bh * NN + off_h + m) * (K * W) + tile, x.to(m_ptr.dtype.element_ty), mask=mt)


@triton.jit
def _read_node(m_ptr, offs_ptr, bh, i, j, NN, K, W):
    """The summary chunk i reads at chunk level j: node (i >> j) - 1 of height j."""
    return m_ptr + (bh * NN + tl.load(offs_ptr + j) + (i >> j) - 1) * (K * W)


@triton.jit
def _carry_node(q, node, K, W, BK: tl.constexpr, PREC: tl.constexpr):
    """q T for the stored summary ``node`` (q's type)."""
    kk = tl.arange(0, BK)
    mk = kk < K
    t = tl.load(node + kk[:, None] * W + kk[None, :], mask=mk[:, None] & mk[None, :], other=0)
    return tl.dot(q, t, input_precision=PREC).to(q.dtype)


@triton.jit
def _carry_leaf(q, p, w_ptr, ge_ptr, c, K, C: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """q T for chunk c's leaf, not stored, from p = q kd_c^T: ge_c q - p w_c (q's type)."""
    kk = tl.arange(0, BK)
    cc = tl.arange(0, C)
    w = tl.load(w_ptr + c * (C * K) + cc[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0)
    return (tl.load(ge_ptr + c) * q.to(tl.float32) - tl.dot(p, w, input_precision=PREC)).to(q.dtype)


@triton.jit
def _tree_read(qw_ptr, lam_ptr, o0_ptr, m_ptr, offs_ptr, out_ptr, w_ptr, u_ptr, kd_ptr, ge_ptr, n, NN, H, K, V, J,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LEAVES: tl.constexpr, PREC: tl.constexpr):
    """One V tile of chunk i's reads of chunk levels 0..J-1 (program: sequence-head * n + chunk, its
    tiles adjacent) added to o0, written to out (both [N, n * C, H, V], out's type). Without LEAVES (no
    leaf stored) level 0 is read from chunk i - 1's factors: with P = q kd^T, q D = P u and
    q T = ge q - P w."""
    pid, tile = _tile_pid((V + BV - 1) // BV)
    bh, i = pid // n, pid % n
    W = K + V
    kk = tl.arange(0, BK)
    cc = tl.arange(0, C)
    vv = tile * BV + tl.arange(0, BV)
    mv = vv[None, :] < V
    dt = qw_ptr.dtype.element_ty
    q = tl.load(qw_ptr + pid * (C * K) + cc[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0)
    b, h = bh // H, bh % H
    rows = (b * n + i) * C + cc
    o = tl.load(o0_ptr + (rows[:, None] * H + h) * V + vv[None, :], mask=mv, other=0).to(tl.float32)
    mk = kk < K
    if not LEAVES:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if (i & 1) == 1:
            prev = pid - 1
            kd = tl.load(kd_ptr + prev * (C * K) + cc[:, None] * K + kk[None, :], mask=mk[None, :], other=0)
            p = tl.dot(q, tl.trans(kd), input_precision=PREC).to(dt)  # [C, C]
            u = tl.load(u_ptr + prev * (C * V) + cc[:, None] * V + vv[None, :], mask=mv, other=0)
            lam = tl.load(lam_ptr + (pid * C + cc) * J)
            o += lam[:, None] * tl.dot(p, u, input_precision=PREC)
            if (i >> 1) != 0:  # a higher level reads
                q = _carry_leaf(q, p, w_ptr, ge_ptr, prev, K, C, BK, PREC)
    for j in range(1 - LEAVES, J):
        if ((i >> j) & 1) == 1:  # chunk i reads chunk level j
            node = _read_node(m_ptr, offs_ptr, bh, i, j, NN, K, W)
            d = tl.load(node + kk[:, None] * W + K + vv[None, :], mask=mk[:, None] & mv, other=0)
            lam = tl.load(lam_ptr + (pid * C + cc) * J + j)
            o += lam[:, None] * tl.dot(q, d, input_precision=PREC)
            if (i >> (j + 1)) != 0:  # a higher level reads: carry q through this block
                q = _carry_node(q, node, K, W, BK, PREC)
    tl.store(out_ptr + (rows[:, None] * H + h) * V + vv[None, :], o.to(out_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _chunk_program(n, K, BK: tl.constexpr, C: tl.constexpr):
    """(program id, sequence-head, chunk, key offsets, row offsets, key mask) of a program per chunk."""
    pid = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, BK)
    return pid, pid // n, pid % n, kk, tl.arange(0, C), kk < K


@triton.jit
def _pair_row(bh, j, i, n, J, C: tl.constexpr, K):
    """Offset of chunk i's pair row for level j in qb / dqa [N * H, J, (n + 1) // 2, C, K]: the chunks
    reading level j (bit j set) numbered without bit j, so a node's readers are consecutive."""
    return ((bh * J + j) * ((n + 1) // 2) + ((i >> (j + 1)) << j) + (i & ((1 << j) - 1))) * (C * K)


@triton.jit
def _pair_read_node(node, qb, dq, lam_ptr, pid, j, J, do_ptr, H, sB, sH, sT, bh, i, n, K: tl.constexpr, V,
                    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """(dq before the read, dlam of the read) of chunk pid's read of level j from a stored summary
    ``node`` by query qb, from dq after it: dq T^T + g D^T and rowsum(do * (qb D)), g = lam_j do."""
    W = K + V
    kk = tl.arange(0, BK)
    cc = tl.arange(0, C)
    mk = kk < K
    dt = qb.dtype
    t_tr = tl.load(node + kk[None, :] * W + kk[:, None], mask=mk[:, None] & mk[None, :], other=0)  # T^T (transposed)
    dq = tl.dot(dq.to(dt), t_tr, input_precision=PREC)
    lam = tl.load(lam_ptr + (pid * C + cc) * J + j)
    read = tl.zeros((C,), dtype=tl.float32)
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        mv = vv < V
        d = tl.load(node + kk[:, None] * W + K + vv[None, :], mask=mk[:, None] & mv[None, :], other=0)
        do = _do_tile(do_ptr, H, sB, sH, sT, bh, i, V, vv, mv[None, :], C)
        read += tl.sum(do * tl.dot(qb, d, input_precision=PREC), axis=1)
        dq = tl.dot((lam[:, None] * do).to(dt), tl.trans(d), dq, input_precision=PREC)
    return dq, read


@triton.jit
def _pair_read_leaf(w_ptr, u_ptr, kd_ptr, ge_ptr, qb, dq, lam_ptr, pid, J, do_ptr, H, sB, sH, sT, bh, i, n,
                    K: tl.constexpr, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    PREC: tl.constexpr):
    """:func:`_pair_read_node` for level 0, its leaf not stored, from chunk prev = pid - 1's factors (T = ge I - kd^T w,
    D = kd^T u): dq T^T = ge dq - (dq w^T) kd, g D^T = (g u^T) kd, qb D = (qb kd^T) u."""
    kk = tl.arange(0, BK)
    cc = tl.arange(0, C)
    mk = kk[None, :] < K
    dt = qb.dtype
    prev = pid - 1
    kd = tl.load(kd_ptr + prev * (C * K) + cc[:, None] * K + kk[None, :], mask=mk, other=0)
    w = tl.load(w_ptr + prev * (C * K) + cc[:, None] * K + kk[None, :], mask=mk, other=0)
    dw = tl.dot(dq.to(dt), tl.trans(w), input_precision=PREC).to(dt)  # dq w^T [C, C]
    dq = tl.load(ge_ptr + prev) * dq - tl.dot(dw, kd, input_precision=PREC)  # dq T^T
    p = tl.dot(qb, tl.trans(kd), input_precision=PREC).to(dt)  # qb kd^T [C, C]
    lam = tl.load(lam_ptr + (pid * C + cc) * J)
    read = tl.zeros((C,), dtype=tl.float32)
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        mv = vv < V
        u = tl.load(u_ptr + prev * (C * V) + cc[:, None] * V + vv[None, :], mask=mv[None, :], other=0)
        do = _do_tile(do_ptr, H, sB, sH, sT, bh, i, V, vv, mv[None, :], C)
        read += tl.sum(do * tl.dot(p, u, input_precision=PREC), axis=1)
        gu = tl.dot((lam[:, None] * do).to(dt), tl.trans(u), input_precision=PREC).to(dt)  # g u^T, this tile's
        dq = tl.dot(gu, kd, dq, input_precision=PREC)
    return dq, read


@triton.jit
def _tree_pairs(qw_ptr, lam_ptr, do_ptr, H, sB, sH, sT, m_ptr, offs_ptr, qb_ptr, dqa_ptr, dqw_ptr, dlam_ptr, w_ptr,
                u_ptr, kd_ptr, ge_ptr, n, NN, K: tl.constexpr, V, J, C: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, LEAVES: tl.constexpr, PREC: tl.constexpr):
    """The reads' backward, per chunk (program axis 0: sequence-head * n + chunk i): the query carried
    up through the blocks chunk i reads as the forward carries it (q before each read stored in qb,
    rows by :func:`_pair_row`), then from the highest read down, with g = lam_j do: dlam_j = rowsum(do *
    (q D)), the gradient of the query after the block stored in dqa (qb's layout: the per-node phase
    sums q^T [dq | g] over a node's readers), dq <- g D^T + dq T^T; dqw = dq after the lowest. Without
    LEAVES (no leaf stored) level 0 goes through chunk i - 1's factors."""
    pid, bh, i, kk, cc, mk = _chunk_program(n, K, BK, C)
    W = K + V
    tile_ck = cc[:, None] * K + kk[None, :]
    dt = qw_ptr.dtype.element_ty
    q = tl.load(qw_ptr + pid * (C * K) + tile_ck, mask=mk[None, :], other=0)
    # Level 0 without LEAVES outside the loops (first up, last down): a branch per level inside them
    # would keep both arms' tiles live (sm_90 spills)
    if not LEAVES:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if (i & 1) == 1:
            tl.store(qb_ptr + _pair_row(bh, 0, i, n, J, C, K) + tile_ck, q, mask=mk[None, :])
            if (i >> 1) != 0:  # chunk i - 1's leaf, from its factors
                kd = tl.load(kd_ptr + (pid - 1) * (C * K) + tile_ck, mask=mk[None, :], other=0)
                p = tl.dot(q, tl.trans(kd), input_precision=PREC).to(dt)
                q = _carry_leaf(q, p, w_ptr, ge_ptr, pid - 1, K, C, BK, PREC)
    for j in range(1 - LEAVES, J):
        if ((i >> j) & 1) == 1:
            tl.store(qb_ptr + _pair_row(bh, j, i, n, J, C, K) + tile_ck, q, mask=mk[None, :])
            if (i >> (j + 1)) != 0:
                q = _carry_node(q, _read_node(m_ptr, offs_ptr, bh, i, j, NN, K, W), K, W, BK, PREC)
    dq = tl.zeros((C, BK), dtype=tl.float32)
    for jr in range(J - 1 + LEAVES):
        j = J - 1 - jr
        if ((i >> j) & 1) == 1:
            node = _read_node(m_ptr, offs_ptr, bh, i, j, NN, K, W)
            row = _pair_row(bh, j, i, n, J, C, K)
            tl.store(dqa_ptr + row + tile_ck, dq.to(dt), mask=mk[None, :])
            qb = tl.load(qb_ptr + row + tile_ck, mask=mk[None, :], other=0)
            dq, read = _pair_read_node(node, qb, dq, lam_ptr, pid, j, J, do_ptr, H, sB, sH, sT, bh, i, n, K, V, C,
                                       BK, BV, PREC)
            tl.store(dlam_ptr + (pid * C + cc) * J + j, read)
        else:  # a level chunk i does not read
            tl.store(dlam_ptr + (pid * C + cc) * J + j, tl.zeros((C,), dtype=tl.float32))
    if not LEAVES:
        read = tl.zeros((C,), dtype=tl.float32)
        if (i & 1) == 1:
            row = _pair_row(bh, 0, i, n, J, C, K)
            tl.store(dqa_ptr + row + tile_ck, dq.to(dt), mask=mk[None, :])
            qb = tl.load(qb_ptr + row + tile_ck, mask=mk[None, :], other=0)
            dq, read = _pair_read_leaf(w_ptr, u_ptr, kd_ptr, ge_ptr, qb, dq, lam_ptr, pid, J, do_ptr, H, sB, sH, sT,
                                       bh, i, n, K, V, C, BK, BV, PREC)
        tl.store(dlam_ptr + (pid * C + cc) * J, read)  # level 0's column
    tl.store(dqw_ptr + pid * (C * K) + tile_ck, dq, mask=mk[None, :])


@triton.jit
def _dm_parent_leaf(parent, w_ptr, u_ptr, kd_ptr, ge_ptr, c, is_left, col0, kk, cc, cols, mk, tile, mt, K, V,
                    C: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """:func:`_dm_tile`'s parent part for chunk c's leaf, not stored, its sibling's summary from the
    sibling chunk's factors (T = ge I - kd^T w, M = [T | kd^T u]): a left leaf gets T_right^T dP =
    ge_r dP - w_r^T (kd_r dP), a right leaf dP M_left^T = ge_l dP_T + (dP [-w | u]_l^T) kd_l in its T
    columns and dP's D columns in its D columns ([BK, BN] float32; the tile's indices as _dm_tile's)."""
    W = K + V
    dt = w_ptr.dtype.element_ty
    if is_left:
        c_r = c + 1
        kd = tl.load(kd_ptr + c_r * (C * K) + cc[:, None] * K + kk[None, :], mask=mk[None, :], other=0)
        w = tl.load(w_ptr + c_r * (C * K) + cc[:, None] * K + kk[None, :], mask=mk[None, :], other=0)
        dp = tl.load(parent + tile, mask=mt, other=0).to(tl.float32)
        x = tl.dot(kd, dp.to(dt), input_precision=PREC).to(dt)  # [C, BN]
        acc = tl.load(ge_ptr + c_r) * dp - tl.dot(tl.trans(w), x, input_precision=PREC)
    else:
        c_l = c - 1
        acc = tl.load(parent + tile, mask=mt & (cols[None, :] >= K), other=0).to(tl.float32)  # D columns
        if col0 < K:
            y = tl.zeros((BK, C), dtype=tl.float32)  # dP [-w | u]^T, the reduction over all of dP's columns
            for p0 in range(0, W, BN):
                pp = p0 + tl.arange(0, BN)
                dp = tl.load(parent + kk[:, None] * W + pp[None, :], mask=mk[:, None] & (pp[None, :] < W), other=0)
                y = tl.dot(dp.to(dt), _factors(w_ptr, u_ptr, c_l, pp, K, V, C, True), y, input_precision=PREC)
                if p0 == col0:  # these are the T columns this tile makes: ge_l dP_T
                    acc += tl.load(ge_ptr + c_l) * tl.where(pp[None, :] < K, dp.to(tl.float32), 0.0)
            kd = tl.load(kd_ptr + c_l * (C * K) + cc[:, None] * K + cols[None, :], mask=cols[None, :] < K, other=0)
            acc = tl.dot(y.to(dt), kd, acc, input_precision=PREC)
    return acc


@triton.jit
def _dm_tile(m_ptr, up_ptr, qb_ptr, dqa_ptr, do_ptr, H, sB, sH, sT, lam_ptr, w_ptr, u_ptr, kd_ptr, ge_ptr, bh, m, h,
             n_h, n_up, off_h, r0, r1, n, NN, K, V, J, col0, PARENT, C: tl.constexpr, BK: tl.constexpr,
             BN: tl.constexpr, LEAVES: tl.constexpr, SIDE: tl.constexpr, PREC: tl.constexpr):
    """Columns col0 .. col0 + BN of the summary gradient dM = [dT | dD] of node m of height h (float32):
    from its parent P = T_right M_left + [0 | D_right] (if PARENT; up_ptr: the parent height's
    gradients [N * H, n_up, K, K + V]): a left node gets T_right^T dP, a right node dP M_left^T in its
    T columns and dP's D columns in its D columns; and, for a left node, from the chunks r0 .. r1 - 1
    that read it: the sum of qb^T [dqa | lam_h do]. Without LEAVES (height 0, no leaf stored) the
    sibling leaf's T_right / M_left come as the factors of chunk m + 1 / m - 1 (w, u, kd, ge). SIDE:
    node m a left (1) or right (2) node, known when compiled (one arm's tiles live, no readers for a
    right node), or 0: from m's parity at run time."""
    W = K + V
    kk = tl.arange(0, BK)
    cc = tl.arange(0, C)
    cols = col0 + tl.arange(0, BN)
    mk = kk < K
    tile = kk[:, None] * W + cols[None, :]
    mt = mk[:, None] & (cols[None, :] < W)
    dt = m_ptr.dtype.element_ty
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    if PARENT:
        parent = up_ptr + (bh * n_up + m // 2) * (K * W)
        is_left = m % 2 == 0 if SIDE == 0 else SIDE == 1
        if LEAVES:
            if is_left:
                right = m_ptr + (bh * NN + off_h + m + 1) * (K * W)
                t_tr = tl.load(right + kk[None, :] * W + kk[:, None], mask=mk[:, None] & mk[None, :], other=0)
                acc = tl.dot(t_tr, tl.load(parent + tile, mask=mt, other=0).to(dt), acc, input_precision=PREC)
            else:
                left = m_ptr + (bh * NN + off_h + m - 1) * (K * W)
                if col0 < K:  # T columns: dP M_left^T, the reduction over all of dP's columns
                    for p0 in range(0, W, BN):
                        pp = p0 + tl.arange(0, BN)
                        dp = tl.load(parent + kk[:, None] * W + pp[None, :], mask=mk[:, None] & (pp[None, :] < W),
                                     other=0)
                        lt = tl.load(left + cols[None, :] * W + pp[:, None],
                                     mask=(pp[:, None] < W) & (cols[None, :] < K), other=0)  # M_left[cols, pp]^T
                        acc = tl.dot(dp.to(dt), lt, acc, input_precision=PREC)
                acc += tl.load(parent + tile, mask=mt & (cols[None, :] >= K), other=0).to(tl.float32)
        else:
            acc = _dm_parent_leaf(parent, w_ptr, u_ptr, kd_ptr, ge_ptr, bh * n + m, is_left, col0, kk, cc, cols, mk,
                                  tile, mt, K, V, C, BK, BN, PREC)
    for i in range(r0, r1 if SIDE != 2 else r0):
        row = _pair_row(bh, h, i, n, J, C, K)
        qb_tr = tl.load(qb_ptr + row + cc[None, :] * K + kk[:, None], mask=mk[:, None], other=0)  # [BK, C]
        dqa = tl.load(dqa_ptr + row + cc[:, None] * K + cols[None, :], mask=cols[None, :] < K, other=0)
        lam = tl.load(lam_ptr + ((bh * n + i) * C + cc) * J + h)
        do = _do_tile(do_ptr, H, sB, sH, sT, bh, i, V, cols - K, (cols[None, :] >= K) & (cols[None, :] < W), C)
        rhs = tl.where(cols[None, :] < K, dqa.to(tl.float32), lam[:, None] * do).to(dt)
        acc = tl.dot(qb_tr, rhs, acc, input_precision=PREC)
    return acc


@triton.jit
def _tree_node_grads(m_ptr, dm_ptr, up_ptr, qb_ptr, dqa_ptr, do_ptr, H, sB, sH, sT, lam_ptr, h, n_h, n_up, off_h, n,
                     NN, K, V, J, SPLITS, R, C: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                     ATOMIC: tl.constexpr, PREC: tl.constexpr):
    """One column tile of the gradient of node m of height h >= 1 (:func:`_dm_tile`), the heights'
    launches running top down, into dm [N * H, n_h, K, K + V] (dm's type; added atomically into
    float32 with SPLITS > 1 programs per node, each summing R of its readers; the first adds the
    parent's part). Program: (sequence-head * n_h + m) * SPLITS + s, its tiles adjacent (sharing qb,
    T_right and dP's rows through L2)."""
    W = K + V
    pid, tile = _tile_pid((W + BN - 1) // BN)
    col0 = tile * BN
    s = pid % SPLITS
    bh, m = (pid // SPLITS) // n_h, (pid // SPLITS) % n_h
    r0 = ((m + 1) << h) + s * R
    r1 = tl.where(m % 2 == 0, tl.minimum(tl.minimum(r0 + R, (m + 2) << h), n), r0)  # readers: left nodes only
    acc = _dm_tile(m_ptr, up_ptr, qb_ptr, dqa_ptr, do_ptr, H, sB, sH, sT, lam_ptr, m_ptr, m_ptr, m_ptr, m_ptr, bh, m,
                   h, n_h, n_up, off_h, r0, r1, n, NN, K, V, J, col0, (s == 0) & (m < 2 * n_up), C=C, BK=BK, BN=BN,
                   LEAVES=True, SIDE=0, PREC=PREC)
    kk = tl.arange(0, BK)
    cols = col0 + tl.arange(0, BN)
    out = dm_ptr + (bh * n_h + m) * (K * W) + kk[:, None] * W + cols[None, :]
    mt = (kk[:, None] < K) & (cols[None, :] < W)
    if ATOMIC:  # relaxed: only later launches read dm (acq_rel fenced every add: ncu_tree_node_grads_h100.json)
        tl.atomic_add(out, acc, mask=mt, sem="relaxed")
    else:
        tl.store(out, acc.to(dm_ptr.dtype.element_ty), mask=mt)


@triton.jit
def _tree_leaf_grads(w_ptr, u_ptr, kd_ptr, ge_ptr, m_ptr, up_ptr, qb_ptr, dqa_ptr, do_ptr, H, sB, sH, sT, lam_ptr,
                     du_ptr, dw_ptr, dkd_ptr, dge_ptr, n, n_up, NN, K: tl.constexpr, V, J, C: tl.constexpr,
                     BK: tl.constexpr, BN: tl.constexpr, LEAVES: tl.constexpr,
                     SPLIT_SIDES: tl.constexpr, PREC: tl.constexpr):
    """Chunk i's gradients (program axis 0: sequence-head * n + i) from its leaf's summary gradient
    [dT | dD] (leaf M = [ge I - kd^T w | kd^T u]), made here tile by tile (:func:`_dm_tile`, height
    0: one reader, chunk i + 1) and never stored: dge = trace(dT), dw = -kd dT, du = kd dD per tile,
    and dkd^T = sum over tiles of dM[:, tile] [-w | u][:, tile]^T (the [-w | u] tile loaded
    transposed), stored through transposed offsets. SPLIT_SIDES: the column loop compiled once for a
    left and once for a right leaf (fewer tiles live, more shared memory), else once for both."""
    pid, bh, i, _, _, _ = _chunk_program(n, K, BK, C)
    if not SPLIT_SIDES:
        _leaf_grads(w_ptr, u_ptr, kd_ptr, ge_ptr, m_ptr, up_ptr, qb_ptr, dqa_ptr, do_ptr, H, sB, sH, sT, lam_ptr,
                    du_ptr, dw_ptr, dkd_ptr, dge_ptr, n, n_up, NN, K, V, J, pid, bh, i, C, BK, BN, LEAVES, 0,
                    PREC)
    elif i % 2 == 0:  # each side compiled on its own: one arm's tiles live through the column loop
        _leaf_grads(w_ptr, u_ptr, kd_ptr, ge_ptr, m_ptr, up_ptr, qb_ptr, dqa_ptr, do_ptr, H, sB, sH, sT, lam_ptr,
                    du_ptr, dw_ptr, dkd_ptr, dge_ptr, n, n_up, NN, K, V, J, pid, bh, i, C, BK, BN, LEAVES, 1,
                    PREC)
    else:
        _leaf_grads(w_ptr, u_ptr, kd_ptr, ge_ptr, m_ptr, up_ptr, qb_ptr, dqa_ptr, do_ptr, H, sB, sH, sT, lam_ptr,
                    du_ptr, dw_ptr, dkd_ptr, dge_ptr, n, n_up, NN, K, V, J, pid, bh, i, C, BK, BN, LEAVES, 2,
                    PREC)


@triton.jit
def _leaf_grads(w_ptr, u_ptr, kd_ptr, ge_ptr, m_ptr, up_ptr, qb_ptr, dqa_ptr, do_ptr, H, sB, sH, sT, lam_ptr, du_ptr,
                dw_ptr, dkd_ptr, dge_ptr, n, n_up, NN, K: tl.constexpr, V, J, pid, bh, i, C: tl.constexpr,
                BK: tl.constexpr, BN: tl.constexpr, LEAVES: tl.constexpr, SIDE: tl.constexpr,
                PREC: tl.constexpr):
    """:func:`_tree_leaf_grads` for chunk i, a left (SIDE 1) or right (2) leaf or either (0)."""
    kk = tl.arange(0, BK)
    cc = tl.arange(0, C)
    mk = kk < K
    W = K + V
    dt = w_ptr.dtype.element_ty
    dkd_tr = tl.zeros((BK, C), dtype=tl.float32)
    trace = 0.0
    r1 = tl.where(i % 2 == 0, tl.minimum(i + 2, n), i + 1)  # a left leaf's reader: chunk i + 1
    for col0 in range(0, W, BN):
        dm = _dm_tile(m_ptr, up_ptr, qb_ptr, dqa_ptr, do_ptr, H, sB, sH, sT, lam_ptr, w_ptr, u_ptr, kd_ptr, ge_ptr, bh,
                      i, 0, n, n_up, 0, i + 1, r1, n, NN, K, V, J, col0, i < 2 * n_up, C=C, BK=BK, BN=BN,
                      LEAVES=LEAVES, SIDE=SIDE, PREC=PREC)
        cols = col0 + tl.arange(0, BN)
        is_t = cols < K
        dkd_tr = tl.dot(dm.to(dt), _factors(w_ptr, u_ptr, pid, cols, K, V, C, True), dkd_tr, input_precision=PREC)
        kd = tl.load(kd_ptr + pid * (C * K) + cc[:, None] * K + kk[None, :], mask=mk[None, :], other=0)  # per tile (L2)
        grad = tl.dot(kd, dm.to(dt), input_precision=PREC)  # kd dM[:, tile]: -dw or du
        if col0 < K:
            trace += tl.sum(tl.sum(tl.where(kk[:, None] == cols[None, :], dm, 0.0), axis=1), axis=0)
            tl.store(dw_ptr + pid * (C * K) + cc[:, None] * K + cols[None, :], -grad, mask=is_t[None, :])
        if col0 + BN > K:
            tl.store(du_ptr + pid * (C * V) + cc[:, None] * V + (cols - K)[None, :], grad,
                     mask=(~is_t & (cols < W))[None, :])
    tl.store(dge_ptr + pid, trace)
    tl.store(dkd_ptr + pid * (C * K) + cc[None, :] * K + kk[:, None], dkd_tr, mask=mk[:, None])


# Columns per program: summaries (BN) and outputs (BV); warps per program. Timed on the H100
# (flag_timing_h100_llgdn_tree_tiles_*.json, fwd / fwd+bwd ms at 8k; at 64k alike): a read program per
# chunk, BV = 128, 4.32 / 18.02 against 4.71 / 18.56 with a program per 64-column V tile (each
# carried the query through the same nodes); 8 warps 5.03 / 18.90; BN (with BV = 64) 128: 4.95 /
# 18.57, 256: 7.65 / 23.61, against 64: 4.80 / 18.32.
TREE_TILES = {"BN": 64, "BV": 128, "num_warps": 4}
# Backward, per kernel: columns per step (pairs: V columns; node and leaf gradients: summary
# columns, 16-bit / float32 operands) and warps; reader chunks per program of the per-node phase
# (more: one program's sum, fewer: atomic adds). From sm_90 compiles (kernel_spills.py): two
# programs per SM for the pairs (255 registers x 4 warps, 90 KB shared) and the node gradients (192
# x 4, 107 KB). Timed on the H100 (fwd+bwd at 64k / 8k): leaf gradients 64 columns 27.39 / 24.47 ms
# vs 32: 28.94 / 26.42 (flag_timing_h100_llgdn_tree_leaf_bn_32_64.json), vs 128: 27.56 / 24.85; node
# gradients 4 warps 27.21 / 24.37 vs 8: 27.64 / 25.24 (..._leaf_bn_64_128, ..._node_warps.json).
# Float32 operands: 32 columns (an A100's shared memory). leaf_sides = 1: the leaf gradients' column
# loop compiled per side (left / right leaf): sm_90 spill 96 -> 24 bytes (leaf-less 352 -> 176), shared
# memory 107 -> 156 KB (one program per SM either way: 8 warps x 255 registers); fwd+bwd 26.08 -> 25.58
# ms at 64k, 23.43 -> 23.02 at 8k (flag_timing_h100_llgdn_tree_leaf_sides.json). 16-bit operands only
# (float32 ones would not fit an A100's shared memory).
TREE_BWD_TILES = {"pairs_BV": 32, "pairs_warps": 4, "node_BN": 64, "node_warps": 4, "leaf_BN": 64,
                  "leaf_warps": 8, "fp32_BN": 32, "readers": 16, "leaf_sides": 1}


class _Tree(NamedTuple):
    """A tree of block summaries: ``m`` [N * H, NN, K, K + V] (heights stacked, node m of height h
    at row ``offs[h] + m``), ``sizes[h]`` nodes per height, ``offsets`` as a device tensor."""

    m: torch.Tensor
    sizes: list[int]
    offs: list[int]
    offsets: torch.Tensor
    leaves: bool  # height 0 stored (else made from the chunks' factors where needed)


def _key_block(K: int) -> int:
    return max(16, triton.next_power_of_2(K))


def _tree_shape(n: int, J: int, leaves: bool = True) -> tuple[list[int], list[int], int]:
    """(nodes per height, each height's first row in the stored tree, rows stored: none of height 0
    without leaves)."""
    sizes = [n >> h for h in range(max(J, 1))]  # nodes per height (a last odd one has no parent)
    stored = [s if h or leaves else 0 for h, s in enumerate(sizes)]
    return sizes, [sum(stored[:h]) for h in range(len(sizes))], sum(stored)


@functools.lru_cache(maxsize=64)
def _offsets_on(offs: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The heights' first rows as a device tensor, made once per tree shape and device: a copy from
    the host waits for the GPU's queue to drain (twice per fwd+bwd otherwise)."""
    return torch.tensor(offs, dtype=torch.int32, device=device)


def build_tree(w: torch.Tensor, u: torch.Tensor, kd: torch.Tensor, ge: torch.Tensor, J: int, prec: str,
               leaves: bool = True) -> _Tree:
    """Every chunk's leaf summary and one merge launch per height up to J - 1 (w, u, kd [N, H, n,
    C, *] contiguous in the operand type, the summaries' type too; ge [N, H, n]). Without ``leaves``
    height 0 is not stored: height 1 is made from the chunks' factors (its readers read the factors)."""
    N, H, n, C, K = w.shape
    V = u.shape[-1]
    BK = _key_block(K)
    BN = min(TREE_TILES["BN"], max(16, triton.next_power_of_2(K + V)))
    sizes, offs, NN = _tree_shape(n, J, leaves)
    NN = max(1, NN)  # a buffer to point at when nothing is stored
    m = w.new_empty(N * H, NN, K, K + V)
    opts = {"num_warps": TREE_TILES["num_warps"]}
    ncol = triton.cdiv(K + V, BN)
    if leaves:
        _tree_leaves[(N * H * n * ncol,)](w, u, kd, ge, m, n, NN, K, V, C=C, BK=BK, BN=BN, PREC=prec, **opts)
    for h in range(1, len(sizes)):
        if not sizes[h]:
            continue
        if h == 1 and not leaves:
            _tree_merge_leaves[(N * H * sizes[h] * ncol,)](w, u, kd, ge, m, n, sizes[h], offs[h], NN, K, V, C=C,
                                                          BK=BK, BN=BN, PREC=prec, **opts)
        else:
            _tree_merge[(N * H * sizes[h] * ncol,)](m, sizes[h], offs[h - 1], offs[h], NN, K, V, BK=BK, BN=BN,
                                                  PREC=prec, **opts)
    return _Tree(m, sizes, offs, _offsets_on(tuple(offs), w.device), leaves)


def tree_reads(o0: torch.Tensor, w: torch.Tensor, u: torch.Tensor, kd: torch.Tensor, ge: torch.Tensor,
               qw: torch.Tensor, lam: torch.Tensor, prec: str, leaves: bool = True) -> tuple[torch.Tensor, _Tree]:
    """o0 [N, n * C, H, V] contiguous plus every chunk level's read -> (o0's shape and type, the tree).
    w, u, kd, qw [N, H, n, C, *] contiguous in the operand type (the summaries' type too),
    ge [N, H, n], lam [N, H, n, C, J] float32. ``leaves``: store height 0 (the backward needs it),
    else level 0 and height 1 are made from the factors."""
    N, H, n, C, K = w.shape
    V, J = u.shape[-1], lam.shape[-1]
    tree = build_tree(w, u, kd, ge, J, prec, leaves)
    BK = _key_block(K)
    BV = min(TREE_TILES["BV"], max(16, triton.next_power_of_2(V)))
    out = torch.empty_like(o0)
    _tree_read[(N * H * n * triton.cdiv(V, BV),)](qw, lam, o0, tree.m, tree.offsets, out, w, u, kd, ge, n,
                                                tree.m.shape[1], H, K, V, J, C=C, BK=BK, BV=BV, LEAVES=leaves,
                                                PREC=prec, num_warps=TREE_TILES["num_warps"])
    return out, tree


def tree_backward(do: torch.Tensor, w: torch.Tensor, u: torch.Tensor, kd: torch.Tensor, ge: torch.Tensor,
                  qw: torch.Tensor, lam: torch.Tensor, prec: str, tree: _Tree | None = None,
                  leaves: bool = True) -> tuple[torch.Tensor, ...]:
    """Gradients (dw, du, dkd, dge, dqw, dlam) of sum(do * reads) for :func:`tree_reads`' reads (do
    an [N, H, n * C, V] view with unit last stride, any type: the output's gradient in its own [N, T,
    H, V] layout, read through the strides; the rest as tree_reads takes them). Four parallel phases,
    no sequential scan: the tree (the forward's, else rebuilt); per chunk its reads' query pairs and
    dqw, dlam; per height >= 1 top down each node's summary gradient (its readers' pairs and its
    parent's, through the merge); per chunk its leaf's summary gradient and from it the chunk's.
    ``leaves``: a rebuilt tree stores height 0, else the leaves are made from the factors where read."""
    N, H, n, C, K = w.shape
    V, J = u.shape[-1], lam.shape[-1]
    tree = tree or build_tree(w, u, kd, ge, J, prec, leaves)
    NN, W = tree.m.shape[1], K + V
    BK = _key_block(K)
    cfg = TREE_BWD_TILES
    BV = min(cfg["pairs_BV"], max(16, triton.next_power_of_2(V)))

    def cols(key: str) -> int:
        return min(cfg[key if w.element_size() < 4 else "fp32_BN"], max(16, triton.next_power_of_2(W)))

    qb, dqa = (w.new_empty(N * H, J, (n + 1) // 2, C, K) for _ in range(2))  # per level, its readers' rows
    dqw, dlam = torch.empty_like(qw), torch.empty_like(lam)
    dos = (do, H, *do.stride()[:3])
    _tree_pairs[(N * H * n,)](qw, lam, *dos, tree.m, tree.offsets, qb, dqa, dqw, dlam, w, u, kd, ge, n, NN, K, V, J,
                              C=C, BK=BK, BV=BV, LEAVES=tree.leaves, PREC=prec, num_warps=cfg["pairs_warps"])
    BN = cols("node_BN")
    up = None  # the gradients of the height above: [N * H, n_h, K, W], 16-bit where no program adds atomically
    for h in reversed(range(1, len(tree.sizes))):
        n_h = tree.sizes[h]
        R = min(1 << h, cfg["readers"])
        splits = (1 << h) // R
        dm = (torch.zeros(N * H, n_h, K, W, device=w.device) if splits > 1
              else w.new_empty(N * H, n_h, K, W))
        if n_h:
            n_up = 0 if up is None else up.shape[1]
            _tree_node_grads[(N * H * n_h * splits * triton.cdiv(W, BN),)](
                tree.m, dm, dm if up is None else up, qb, dqa, *dos, lam, h, n_h, n_up, tree.offs[h], n, NN, K, V, J,
                splits, R, C=C, BK=BK, BN=BN, ATOMIC=splits > 1, PREC=prec, num_warps=cfg["node_warps"])
        up = dm
    du, dw, dkd, dge = torch.empty_like(u), torch.empty_like(w), torch.empty_like(kd), torch.empty_like(ge)
    n_up = 0 if up is None else up.shape[1]
    _tree_leaf_grads[(N * H * n,)](w, u, kd, ge, tree.m, kd if up is None else up, qb, dqa, *dos, lam, du, dw, dkd,
                                   dge, n, n_up, NN, K, V, J, C=C, BK=BK, BN=cols("leaf_BN"), LEAVES=tree.leaves,
                                   SPLIT_SIDES=bool(cfg["leaf_sides"]) and w.element_size() < 4, PREC=prec,
                                   num_warps=cfg["leaf_warps"])
    return dw, du, dkd, dge, dqw, dlam
