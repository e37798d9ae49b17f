"""Log-linear Gated DeltaNet's chunk-level reads through a tree of block summaries (forward only),
the Triton form of the chunk reference's ``loglinear._tree_reads``.

Each aligned block of 2^h chunks has a summary M = [T | D] ([K, K + V], operand type): T its
transition (the state at its end = T S + D for the state S at its start) and D its writes carried
to its end. Leaves (chunks): M = [ge I - kd^T w | kd^T u]; a parent from its halves:
M = T_right M_left + [0 | D_right]. Chunk i reads chunk level j (bit j of i set) from the block of
2^j chunks just before ``i >> j << j``, carried to i through the blocks of i's lower set bits: its
set bits from the lowest up, ``o += lam_j (q D); q <- q T``, with q = qw_i. No sequential scan:
every chunk reads in parallel, the tree takes one launch per height; no per-level state per chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tree_leaves(w_ptr, u_ptr, kd_ptr, ge_ptr, m_ptr, n, NN, K, V, C: tl.constexpr, BK: tl.constexpr,
                 BN: tl.constexpr, PREC: tl.constexpr):
    """One column tile (program axis 1) of chunk i's leaf summary [ge I - kd^T w | kd^T u] (program
    axis 0: sequence-head * n + chunk), into node i of height 0."""
    pid = tl.program_id(0).to(tl.int64)
    bh, i = pid // n, pid % n
    W = K + V
    kk = tl.arange(0, BK)
    cc = tl.arange(0, C)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    is_t = cols < K
    dt = w_ptr.dtype.element_ty
    kd = tl.load(kd_ptr + pid * (C * K) + cc[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0)
    w = tl.load(w_ptr + pid * (C * K) + cc[:, None] * K + cols[None, :], mask=is_t[None, :], other=0)
    u = tl.load(u_ptr + pid * (C * V) + cc[:, None] * V + (cols - K)[None, :],
                mask=(~is_t & (cols < W))[None, :], other=0)
    rhs = tl.where(is_t[None, :], -w.to(tl.float32), u.to(tl.float32)).to(dt)  # [-w | u], negated in float32
    x = tl.dot(tl.trans(kd), rhs, input_precision=PREC)  # [BK, BN]
    x += tl.where(kk[:, None] == cols[None, :], tl.load(ge_ptr + pid), 0.0)
    tl.store(m_ptr + (bh * NN + i) * (K * W) + kk[:, None] * W + cols[None, :], x.to(dt),
             mask=(kk[:, None] < K) & (cols[None, :] < W))


@triton.jit
def _tree_merge(m_ptr, n_h, off_prev, off_h, NN, K, V, BK: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """One column tile of node m of a height from nodes 2m (left) and 2m + 1 (right) of the height
    below (program axis 0: sequence-head * n_h + m): T_right [T_left | D_left] + [0 | D_right]."""
    pid = tl.program_id(0).to(tl.int64)
    bh, m = pid // n_h, pid % n_h
    W = K + V
    kk = tl.arange(0, BK)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
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
def _tree_read(qw_ptr, lam_ptr, o0_ptr, m_ptr, offs_ptr, out_ptr, n, NN, H, K, V, J, C: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Chunk i's reads of chunk levels 0..J-1 (program axis 0: sequence-head * n + chunk; axis 1: V
    tile) added to o0, written to out [N, n * C, H, V] (out's type)."""
    pid = tl.program_id(0).to(tl.int64)
    bh, i = pid // n, pid % n
    W = K + V
    kk = tl.arange(0, BK)
    cc = tl.arange(0, C)
    vv = tl.program_id(1) * BV + tl.arange(0, BV)
    mv = vv[None, :] < V
    dt = qw_ptr.dtype.element_ty
    q = tl.load(qw_ptr + pid * (C * K) + cc[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0)
    o = tl.load(o0_ptr + pid * (C * V) + cc[:, None] * V + vv[None, :], mask=mv, other=0)
    mk = kk < K
    for j in range(J):
        if ((i >> j) & 1) == 1:  # chunk level j: node (i >> j) - 1 of height j
            node = m_ptr + (bh * NN + tl.load(offs_ptr + j) + (i >> j) - 1) * (K * W)
            d = tl.load(node + kk[:, None] * W + K + vv[None, :], mask=mk[:, None] & mv, other=0)
            lam = tl.load(lam_ptr + (pid * C + cc) * J + j)
            o += lam[:, None] * tl.dot(q, d, input_precision=PREC)
            if (i >> (j + 1)) != 0:  # a higher level reads: carry q through this block
                t = tl.load(node + kk[:, None] * W + kk[None, :], mask=mk[:, None] & mk[None, :], other=0)
                q = tl.dot(q, t, input_precision=PREC).to(dt)
    b, h = bh // H, bh % H
    rows = (b * n + i) * C + cc
    tl.store(out_ptr + (rows[:, None] * H + h) * V + vv[None, :], o.to(out_ptr.dtype.element_ty), mask=mv)


# Columns per program: summaries (BN) and outputs (BV); warps per program. Not yet timed.
TREE_TILES = {"BN": 64, "BV": 64, "num_warps": 4}


def tree_reads(o0: torch.Tensor, w: torch.Tensor, u: torch.Tensor, kd: torch.Tensor, ge: torch.Tensor,
               qw: torch.Tensor, lam: torch.Tensor, prec: str, out_dtype: torch.dtype) -> torch.Tensor:
    """o0 [N, H, n, C, V] float32 plus every chunk level's read -> [N, n * C, H, V] in ``out_dtype``.
    w, u, kd, qw [N, H, n, C, *] contiguous in the operand type (the summaries' type too), ge [N, H, n],
    lam [N, H, n, C, J] float32."""
    N, H, n, C, K = w.shape
    V, J = u.shape[-1], lam.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    BN = min(TREE_TILES["BN"], max(16, triton.next_power_of_2(K + V)))
    BV = min(TREE_TILES["BV"], max(16, triton.next_power_of_2(V)))
    sizes = [n >> h for h in range(max(J, 1))]  # nodes per height (a last odd one has no parent)
    offs = [sum(sizes[:h]) for h in range(len(sizes))]
    NN = sum(sizes)
    summaries = w.new_empty(N * H, NN, K, K + V)
    opts = {"num_warps": TREE_TILES["num_warps"]}
    ncol = triton.cdiv(K + V, BN)
    _tree_leaves[(N * H * n, ncol)](w, u, kd, ge, summaries, n, NN, K, V, C=C, BK=BK, BN=BN, PREC=prec, **opts)
    for h in range(1, J):
        _tree_merge[(N * H * sizes[h], ncol)](summaries, sizes[h], offs[h - 1], offs[h], NN, K, V, BK=BK, BN=BN,
                                              PREC=prec, **opts)
    out = w.new_empty(N, n * C, H, V, dtype=out_dtype)
    offsets = torch.tensor(offs, dtype=torch.int32, device=w.device)
    _tree_read[(N * H * n, triton.cdiv(V, BV))](qw, lam, o0, summaries, offsets, out, n, NN, H, K, V, J, C=C,
                                                BK=BK, BV=BV, PREC=prec, **opts)
    return out
