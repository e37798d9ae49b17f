"""Triton kernels for log-linear (Fenwick-tree) Mamba-2, forward and backward.

Imported lazily (only by :mod:`hippolm.ops.triton_backend`), so installs without Triton never load it.
Sequences start at position 0 and are given as a dense batch [B, T, H, D]; packing, initial states
and final states are handled around these kernels in :mod:`hippolm.ops.triton_backend`.

Algorithm (chunk size C, levels 0..log2 C inside a chunk, chunk-level bit j = level log2(C)+1+j):

* intra-chunk: one dense C x C block ``(q k^T) * exp(gl_t - gl_s) * lam[t, level(t, s)]`` with
  the level from integer bit operations on the in-chunk offsets (chunks are aligned, so these
  are the low bits of the absolute positions);
* a binary tree of chunk states: node (0, c) = sum_{s in chunk c} exp(decay s -> chunk end) k_s v_s^T,
  node (j+1, m) = exp(decay over node (j, 2m+1)) node (j, 2m) + node (j, 2m+1); every node is
  decayed to the end of its (aligned, clipped) block of 2^j chunks. The low levels are built chunk
  by chunk in one program per block of 2^BUILD_LEVELS chunks, which stores only the even nodes
  (the only ones read); the levels above by one launch each;
* chunk i reads, for each set bit j of i, node (j, (i >> j) - 1) (its Fenwick sibling at that
  level) with per-row weight ``lam[t, log2(C)+1+j] * exp(decay from the node's end to t)``.
  These reads are most of the FLOPs, all ``tl.dot``.

Backward: every decay enters as exp(Gc_t - Gc_s) of the global cumulative log decay Gc, so
``dGc_t = q_t . dq_t - k_t . dk_t`` and ``dg`` is its reverse cumulative sum (no per-factor
decay gradients). The key side mirrors the query side: for each level j, the queries of a reader
block m+1 are summed into one state ``sum_t coef[t, j] q_t do_t^T`` (kernel ``_direct``, split into
segments of chunks for balance); chunk c then reads the states of the blocks that read it.

Decays between chunks use an exclusive float64 cumulative sum of the chunk totals, so no long
float32 cumulative sum is ever differenced.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Chunks per program of the backward block sums: long top-level blocks are split so no program
# loops over more than SEG chunks (load balance at long T); partial sums are added in torch.
SEG = 16
# Tree levels built in one program per aligned block of 2**BUILD_LEVELS chunks (_build_block); the
# levels above by one _combine launch each. 0: one program per chunk, every level by _combine.
BUILD_LEVELS = 4
# V columns per program of the forward reads and the tree build (_fwd, _build_block). 128: one program
# per chunk and head at V = 128, reading q and k once (sm_90: 231 / 247 registers, no spill with 8
# warps). H100, bf16, 64k tokens (flag_timing_h100_llssd_fwd_v_tile.json): forward 4.45 -> 3.42 ms at
# T = 8k and 4.67 -> 3.87 at 64k against 64 columns (two programs per head).
FWD_V_TILE = 128
# The key-side / query-side backward (_bwd_kv / _bwd_q) takes V in this many pieces (registers; 1: all
# V at once). H100 with GRAD_OPERANDS 2 (flag_timing_h100_llssd_{kv,q}_v_pieces.json): _bwd_kv in 2
# pieces no change (fwd+bwd 12.74 vs 12.71 ms at 8k, 14.71 / 14.69 at 64k), _bwd_q in 4 slower
# (12.77 -> 13.52, 14.69 -> 15.90).
KV_V_PIECES = 1
Q_V_PIECES = 1
# Store tree nodes in float32 also for 16-bit inputs (accuracy; costs tree bandwidth).
TREE_FP32 = True
# For 16-bit inputs, how the backward's dots take their computed operands (tree nodes, query-side
# states, masked score products; see _mm): 0 rounded to 16 bits, 1 float32 (TF32 products), 2 as a sum
# of two 16-bit parts (bf16 inputs; fp16 takes 1). Not 0: dg is a cumulative sum of q.dq - k.dk, whose
# terms largely cancel, so their rounding error grows into dg's. 2 spills far fewer registers on sm_90
# (the key-side backward: 336 bytes of stack vs 904) and is faster on the H100 at the same accuracy
# (flag_timing_h100_llssd_grad_operands.json: fwd+bwd 16.00 -> 12.63 ms at 8k, 17.98 -> 15.08 at 64k;
# bf16 dg 0.33% off at T = 3000, kernel_errors_h100_llssd_T3000_hilo.json).
GRAD_OPERANDS = 2


@triton.jit
def _level_weights(lam_base, row_off, valid, xor, L, CB: tl.constexpr):
    """lam[row, level(xor)] for an in-chunk tile of xor = t ^ s (rows t, or columns, broadcast by the
    caller's shapes): level 0 where xor == 0, else level l where the highest set bit of xor is l-1.
    One column load per level and a select, no gathered pointer tile (registers)."""
    out = tl.where(xor == 0, tl.load(lam_base + row_off, mask=valid, other=0), 0.0)
    for lvl in tl.static_range(1, CB + 1):
        col = tl.load(lam_base + row_off + lvl, mask=valid & (lvl < L), other=0)
        out = tl.where((xor >> (lvl - 1)) == 1, col, out)
    return out


@triton.jit
def _mm(a, b, A_INPUT: tl.constexpr, GM: tl.constexpr, PREC: tl.constexpr):
    """a @ b (float32 result) where one operand is a 16-bit input (a if A_INPUT, else b) and the other is
    computed in float32, by GM (see GRAD_OPERANDS): 0 the computed one rounded to the input's type,
    1 both in float32 (TF32 products), 2 the computed one as hi + lo, two numbers of the input's type
    (two 16-bit dots: ~17 bits of the computed operand, the input operand kept 16-bit in registers)."""
    if GM == 1:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    elif A_INPUT:
        hi = b.to(a.dtype)
        out = tl.dot(a, hi, input_precision=PREC)
        if GM == 2:
            out = tl.dot(a, (b - hi.to(tl.float32)).to(a.dtype), out, input_precision=PREC)
    else:
        hi = a.to(b.dtype)
        out = tl.dot(hi, b, input_precision=PREC)
        if GM == 2:
            out = tl.dot((a - hi.to(tl.float32)).to(b.dtype), b, out, input_precision=PREC)
    return out


@triton.jit
def _rows(base, t, T, stride, cols, D):
    """Tile base[t * stride + cols] of one (batch, head) of a [B, T, H, D] tensor, zero outside t < T,
    cols < D. ``base`` already points at (b, 0, h, 0) (int64 scalar math); tile offsets stay int32."""
    return tl.load(base + t[:, None] * stride + cols[None, :], mask=(t < T)[:, None] & (cols[None, :] < D), other=0)


@triton.jit
def _build_block(k_ptr, v_ptr, gl_ptr, gch_ptr, tree_ptr, toff_ptr, T, H, K, V, Tp, n, X,
                 S: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                 GM: tl.constexpr):
    """Tree levels 0..S of one aligned block of 2**S chunks and one V tile, chunk by chunk.

    Node (0, c) = sum_s exp(gl_end - gl_s) k_s v_s^T (decayed keys as GM says: the backward reads
    these nodes). When chunk c ends a level-j node, that node is the level-(j-1) node just finished
    (in registers) plus, if it is a right child, its left sibling decayed to c's end. Readers only
    ever read even nodes (chunk i reads node (j, (i >> j) - 1) for bit j of i set), so below level S
    only even nodes are stored (odd ones live in registers only) and the left siblings re-read come
    from L2; level S keeps all its nodes for the combines above it."""
    blk, bh, iv = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    b, h = bh // H, bh % H
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    msk = (kk[:, None] < K) & (vv[None, :] < V)
    tile = kk[:, None] * V + vv[None, :]
    nodes = tree_ptr + bh * X * (K * V)
    kb = k_ptr + (b * T * H + h) * K
    vb = v_ptr + (b * T * H + h) * V
    glb = gl_ptr + bh * Tp
    gcb = gch_ptr + bh * (n + 1)
    for c in range(blk << S, tl.minimum((blk + 1) << S, n)):
        t = c * C + tl.arange(0, C)
        kx = _rows(kb, t, T, H * K, kk, K)
        vx = _rows(vb, t, T, H * V, vv, V)
        w = tl.exp(tl.load(glb + c * C + C - 1) - tl.load(glb + t))
        cur = _mm(tl.trans(kx.to(tl.float32) * w[:, None]), vx, False, GM, PREC)
        if ((c & 1) == 0) | (S == 0):
            tl.store(nodes + (tl.load(toff_ptr) + c) * (K * V) + tile, cur.to(tree_ptr.dtype.element_ty), mask=msk)
        for j in tl.static_range(1, S + 1):
            # the level-j node of chunk c ends here (aligned end, or the clipped last node)
            if (((c + 1) & ((1 << j) - 1)) == 0) | (c == n - 1):
                child = c >> (j - 1)
                if (child & 1) == 1:
                    tl.debug_barrier()  # the sibling was stored by other threads of this program
                    left = tl.load(nodes + (tl.load(toff_ptr + j - 1) + child - 1) * (K * V) + tile, mask=msk,
                                   other=0)
                    decay = (tl.load(gcb + c + 1) - tl.load(gcb + (child << (j - 1)))).to(tl.float32)
                    cur = tl.exp(decay) * left.to(tl.float32) + cur
                if (((c >> j) & 1) == 0) | (j == S):
                    tl.store(nodes + (tl.load(toff_ptr + j) + (c >> j)) * (K * V) + tile,
                             cur.to(tree_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _combine(tree_ptr, gch_ptr, n, X, off_in, off_out, cnt_in, j, K, V,
             BK: tl.constexpr, BV: tl.constexpr):
    """node (j+1, m) = exp(decay over the right child) * left child + right child (one K x BV tile)."""
    m, bh, iv = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    msk = (kk[:, None] < K) & (vv[None, :] < V)
    tile = kk[:, None] * V + vv[None, :]
    nodes = tree_ptr + bh * X * (K * V)
    left = tl.load(nodes + (off_in + 2 * m) * (K * V) + tile, mask=msk, other=0).to(tl.float32)
    has_right = 2 * m + 1 < cnt_in
    right = tl.load(nodes + (off_in + 2 * m + 1) * (K * V) + tile, mask=msk & has_right, other=0)
    gcb = gch_ptr + bh * (n + 1)
    decay = (tl.load(gcb + tl.minimum((2 * m + 2) << j, n)) - tl.load(gcb + tl.minimum((2 * m + 1) << j, n)))
    node = tl.exp(decay.to(tl.float32)) * left + right.to(tl.float32)
    tl.store(nodes + (off_out + m) * (K * V) + tile, node.to(tree_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _fwd(q_ptr, k_ptr, v_ptr, gl_ptr, lam_ptr, gch_ptr, tree_ptr, toff_ptr, o_ptr,
         scale, T, H, K, V, L, Tp, n, X, J,
         C: tl.constexpr, CB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Output of one chunk and V tile: intra-chunk block + one tree-node read per set bit."""
    i, bh, iv = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    b, h = bh // H, bh % H
    r = tl.arange(0, C)
    t = i * C + r
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    tm = t < T
    qx = _rows(q_ptr + (b * T * H + h) * K, t, T, H * K, kk, K)
    kx = _rows(k_ptr + (b * T * H + h) * K, t, T, H * K, kk, K)
    vx = _rows(v_ptr + (b * T * H + h) * V, t, T, H * V, vv, V)
    gl = tl.load(gl_ptr + bh * Tp + t)
    lamb = lam_ptr + (b * T * H + h) * L
    lrow = t * (H * L)  # lam[b, t, h, l] = lamb[lrow + l]

    causal = r[:, None] >= r[None, :]
    lam_in = _level_weights(lamb, lrow[:, None], tm[:, None], r[:, None] ^ r[None, :], L, CB)
    s = tl.dot(qx, tl.trans(kx), input_precision=PREC)
    p = tl.where(causal, s * tl.exp(gl[:, None] - gl[None, :]) * lam_in, 0.0)
    acc = tl.dot(p.to(vx.dtype), vx, input_precision=PREC)

    eg = tl.exp(gl)
    gcb = gch_ptr + bh * (n + 1)
    gi = tl.load(gcb + i)
    nodes = tree_ptr + bh * X * (K * V)
    tile = kk[:, None] * V + vv[None, :]
    for j in range(J):
        if ((i >> j) & 1) == 1:
            node = tl.load(nodes + (tl.load(toff_ptr + j) + (i >> j) - 1) * (K * V) + tile,
                           mask=(kk[:, None] < K) & (vv[None, :] < V), other=0)
            d = (gi - tl.load(gcb + ((i >> j) << j))).to(tl.float32)
            lam_j = tl.load(lamb + lrow + CB + 1 + j, mask=tm & (CB + 1 + j < L), other=0)
            qw = (qx.to(tl.float32) * (lam_j * eg * tl.exp(d))[:, None]).to(qx.dtype)
            acc += tl.dot(qw, node.to(qx.dtype), input_precision=PREC)
    o = o_ptr + (b * T * H + h) * V + t[:, None] * (H * V) + vv[None, :]
    tl.store(o, (acc * scale).to(o_ptr.dtype.element_ty), mask=tm[:, None] & (vv[None, :] < V))


@triton.jit
def _bwd_q(q_ptr, k_ptr, v_ptr, do_ptr, gl_ptr, lam_ptr, gch_ptr, tree_ptr, toff_ptr,
           dq_ptr, dlam_ptr, dgq_ptr,
           scale, T, H, K, V, L, Tp, n, X, J,
           C: tl.constexpr, CB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NP: tl.constexpr,
           PREC: tl.constexpr, GM: tl.constexpr):
    """dq, dlam (all levels) and q . dq of one chunk (full K, V in NP pieces of BV columns: registers);
    GM: see _mm."""
    i, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    r = tl.arange(0, C)
    t = i * C + r
    kk = tl.arange(0, BK)
    tm = t < T
    qb = q_ptr + (b * T * H + h) * K
    qx = _rows(qb, t, T, H * K, kk, K)
    dob = do_ptr + (b * T * H + h) * V
    vb = v_ptr + (b * T * H + h) * V
    do0 = _rows(dob, t, T, H * V, tl.arange(0, BV), V).to(qx.dtype)  # NP == 1: loaded once for every level
    gl = tl.load(gl_ptr + bh * Tp + t)
    lamb = lam_ptr + (b * T * H + h) * L
    dlamb = dlam_ptr + (b * T * H + h) * L
    lrow = t * (H * L)

    # Inter-chunk part first (fewer live tiles): one tree node per set bit.
    eg = tl.exp(gl)
    gcb = gch_ptr + bh * (n + 1)
    gi = tl.load(gcb + i)
    nodes = tree_ptr + bh * X * (K * V)
    dq = tl.zeros((C, BK), dtype=tl.float32)
    for j in range(J):
        if ((i >> j) & 1) == 1:
            node_j = nodes + (tl.load(toff_ptr + j) + (i >> j) - 1) * (K * V)
            e = eg * tl.exp((gi - tl.load(gcb + ((i >> j) << j))).to(tl.float32))
            lam_j = tl.load(lamb + lrow + CB + 1 + j, mask=tm & (CB + 1 + j < L), other=0)
            x = tl.zeros((C, BK), dtype=tl.float32)  # do @ node^T
            for p in tl.static_range(NP):
                vv = p * BV + tl.arange(0, BV)
                node = tl.load(node_j + kk[:, None] * V + vv[None, :], mask=(kk[:, None] < K) & (vv[None, :] < V),
                               other=0)
                dop = do0 if NP == 1 else _rows(dob, t, T, H * V, vv, V).to(qx.dtype)
                x += _mm(dop, tl.trans(node.to(tl.float32)), True, GM, PREC)
            dq += (lam_j * e)[:, None] * x
            dl = tl.sum(qx.to(tl.float32) * x, axis=1) * e * scale
            tl.store(dlamb + lrow + CB + 1 + j, dl, mask=tm & (CB + 1 + j < L))

    kx = _rows(k_ptr + (b * T * H + h) * K, t, T, H * K, kk, K)
    causal = r[:, None] >= r[None, :]
    xor = r[:, None] ^ r[None, :]
    dp = tl.zeros((C, C), dtype=tl.float32)
    for p in tl.static_range(NP):
        vv = p * BV + tl.arange(0, BV)
        vx = _rows(vb, t, T, H * V, vv, V)
        dop = do0 if NP == 1 else _rows(dob, t, T, H * V, vv, V).to(qx.dtype)
        dp += tl.dot(dop, tl.trans(vx), input_precision=PREC)
    dp = tl.where(causal, dp * tl.exp(gl[:, None] - gl[None, :]), 0.0)
    s = tl.dot(qx, tl.trans(kx), input_precision=PREC)
    sdp = s * dp * scale
    tl.store(dlamb + lrow, tl.sum(tl.where(xor == 0, sdp, 0.0), axis=1), mask=tm)
    for lvl in tl.static_range(1, CB + 1):
        dl = tl.sum(tl.where((xor >> (lvl - 1)) == 1, sdp, 0.0), axis=1)
        tl.store(dlamb + lrow + lvl, dl, mask=tm & (lvl < L))
    lam_in = _level_weights(lamb, lrow[:, None], tm[:, None], xor, L, CB)
    dq += _mm(dp * lam_in, kx, False, GM, PREC)
    dq = dq * scale
    tl.store(dq_ptr + (b * T * H + h) * K + t[:, None] * (H * K) + kk[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=tm[:, None] & (kk[None, :] < K))
    tl.store(dgq_ptr + bh * Tp + t, tl.sum(qx.to(tl.float32) * dq, axis=1))


@triton.jit
def _direct(q_ptr, do_ptr, gl_ptr, lam_ptr, gch_ptr, out_ptr,
            scale, T, H, K, V, L, Tp, n, j, nseg, segc, seg_stride, out_bh_stride,
            C: tl.constexpr, CB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
            GM: tl.constexpr):
    """Query-side state of level j for the reader block 2*blk+1 (one segment of it, one V tile):
    sum over its tokens t of scale * lam[t, CB+1+j] * exp(decay from the block start to t) q_t do_t^T."""
    pid, bh, iv = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    b, h = bh // H, bh % H
    blk = pid // nseg
    seg = pid % nseg
    start = (2 * blk + 1) << j
    c0 = start + seg * segc
    c1 = tl.minimum(tl.minimum(c0 + segc, (2 * blk + 2) << j), n)
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    qb = q_ptr + (b * T * H + h) * K
    dob = do_ptr + (b * T * H + h) * V
    lamb = lam_ptr + (b * T * H + h) * L + CB + 1 + j
    glb = gl_ptr + bh * Tp
    gcb = gch_ptr + bh * (n + 1)
    g0 = tl.load(gcb + start)
    acc = tl.zeros((BK, BV), dtype=tl.float32)
    for c in range(c0, c1):
        t = c * C + tl.arange(0, C)
        tm = t < T
        qx = _rows(qb, t, T, H * K, kk, K)
        dox = _rows(dob, t, T, H * V, vv, V)
        lam_j = tl.load(lamb + t * (H * L), mask=tm & (CB + 1 + j < L), other=0)
        d = (tl.load(gcb + c) - g0).to(tl.float32)
        coef = lam_j * tl.exp(tl.load(glb + t) + d) * scale
        acc += _mm(tl.trans(qx.to(tl.float32) * coef[:, None]), dox.to(qx.dtype), False, GM, PREC)
    out = out_ptr + seg * seg_stride + bh * out_bh_stride + blk * (K * V) + kk[:, None] * V + vv[None, :]
    tl.store(out, acc, mask=(kk[:, None] < K) & (vv[None, :] < V))


@triton.jit
def _bwd_kv(q_ptr, k_ptr, v_ptr, do_ptr, gl_ptr, lam_ptr, gch_ptr, dir_ptr, doff_ptr,
            dk_ptr, dv_ptr, dgk_ptr,
            scale, T, H, K, V, L, Tp, n, Y, J,
            C: tl.constexpr, CB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NP: tl.constexpr,
            PREC: tl.constexpr, GM: tl.constexpr):
    """dk, dv and k . dk of one chunk: the query-side states of the blocks reading it + intra block
    (GM: see _mm). V in NP pieces of BV columns (registers: a float32 K x V state is 64 KB):
    dk and the intra block's v . do sum over the pieces, dv is stored piece by piece."""
    c, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    r = tl.arange(0, C)
    t = c * C + r
    kk = tl.arange(0, BK)
    tm = t < T
    glb = gl_ptr + bh * Tp
    gl = tl.load(glb + t)
    gcb = gch_ptr + bh * (n + 1)
    gc1 = tl.load(gcb + c + 1)
    dirs = dir_ptr + bh * Y * (K * V)
    vb = v_ptr + (b * T * H + h) * V
    dob = do_ptr + (b * T * H + h) * V
    kx = _rows(k_ptr + (b * T * H + h) * K, t, T, H * K, kk, K)
    qx = _rows(q_ptr + (b * T * H + h) * K, t, T, H * K, kk, K)
    w = tl.exp(tl.load(glb + c * C + C - 1) - gl)

    # Intra block, transposed: rows are keys s, columns queries t (t >= s).
    causal_t = r[:, None] <= r[None, :]
    lam_t = _level_weights(lam_ptr + (b * T * H + h) * L, (t * (H * L))[None, :], tm[None, :],
                           r[:, None] ^ r[None, :], L, CB)
    m_t = tl.where(causal_t, tl.exp(gl[None, :] - gl[:, None]) * lam_t * scale, 0.0)
    # The intra block's part of dk first (its v . do over every piece of V), so the mask is not
    # live through the loop below (registers).
    dp_t = tl.zeros((C, C), dtype=tl.float32)
    for p in tl.static_range(NP):
        vv = p * BV + tl.arange(0, BV)
        vx = _rows(vb, t, T, H * V, vv, V)
        dp_t += tl.dot(vx, tl.trans(_rows(dob, t, T, H * V, vv, V).to(vx.dtype)), input_precision=PREC)
    dk = _mm(dp_t * m_t, qx, False, GM, PREC)
    sm_t = tl.dot(kx, tl.trans(qx), input_precision=PREC) * m_t

    for p in tl.static_range(NP):
        vv = p * BV + tl.arange(0, BV)
        tile = kk[:, None] * V + vv[None, :]
        # Sum of the query-side states reading this chunk, decayed to this chunk's end.
        state = tl.zeros((BK, BV), dtype=tl.float32)
        for j in range(J):
            mj = c >> j
            if ((mj & 1) == 0) & (((mj + 1) << j) < n):
                d = tl.load(dirs + (tl.load(doff_ptr + j) + (mj >> 1)) * (K * V) + tile,
                            mask=(kk[:, None] < K) & (vv[None, :] < V), other=0)
                state += tl.exp((tl.load(gcb + ((mj + 1) << j)) - gc1).to(tl.float32)) * d
        vx = _rows(vb, t, T, H * V, vv, V)
        dox = _rows(dob, t, T, H * V, vv, V).to(vx.dtype)
        dk += w[:, None] * _mm(vx, tl.trans(state), True, GM, PREC)
        dv = w[:, None] * _mm(kx, state, True, GM, PREC) + _mm(sm_t, dox, False, GM, PREC)
        tl.store(dv_ptr + (b * T * H + h) * V + t[:, None] * (H * V) + vv[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=tm[:, None] & (vv[None, :] < V))
    tl.store(dk_ptr + (b * T * H + h) * K + t[:, None] * (H * K) + kk[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=tm[:, None] & (kk[None, :] < K))
    tl.store(dgk_ptr + bh * Tp + t, tl.sum(kx.to(tl.float32) * dk, axis=1))


# ---------------------------------------------------------------------------------------------
# Host side


_OFFSETS: dict[tuple, torch.Tensor] = {}  # (offsets, device) -> int32 tensor


def _on_device(offsets: list[int], device: torch.device) -> torch.Tensor:
    """The tree's level offsets as a tensor on ``device``, made once per (offsets, device): a fresh
    host-to-device copy each call would wait for the queued GPU work and leave the GPU idle while the
    next launches are issued."""
    key = (tuple(offsets), str(device))
    if key not in _OFFSETS:
        _OFFSETS[key] = torch.tensor(offsets, dtype=torch.int32, device=device)
    return _OFFSETS[key]


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


class _Plan:
    """Shapes, tree layout and launch parameters shared by forward and backward."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, lam: torch.Tensor, C: int):
        B, T, H, K = q.shape
        self.B, self.T, self.H, self.K, self.V, self.L = B, T, H, K, v.shape[-1], lam.shape[-1]
        self.C, self.CB = C, C.bit_length() - 1
        self.n = -(-T // C)
        self.Tp = self.n * C
        self.J = (self.n - 1).bit_length()  # chunk-level bits that some chunk has set
        cnt, toff, doff, x, y = self.n, [], [], 0, 0
        self.counts = []
        for _ in range(max(self.J, 1)):
            toff.append(x)
            doff.append(y)
            self.counts.append(cnt)
            x += cnt
            y += cnt // 2
            cnt = (cnt + 1) // 2
        self.X, self.Y = x, y
        self.S = max(0, min(BUILD_LEVELS, self.J - 1))  # tree levels built per block by _build_block
        dev = q.device
        self.toff_list, self.doff_list = toff, doff  # host copies: launches read them without a device sync
        self.toff, self.doff = _on_device(toff, dev), _on_device(doff, dev)
        self.BK, self.BV_full = _pow2(self.K), _pow2(self.V)
        self.BV = min(self.BV_full, 64)  # _direct's V tile: two tiles at V=128 (registers; more programs)
        self.NV = -(-self.V // self.BV)
        self.BV_fwd = min(self.BV_full, FWD_V_TILE)  # _fwd's and _build_block's
        self.NV_fwd = -(-self.V // self.BV_fwd)
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"
        # Tree nodes in float32 (rounded to the input dtype only as dot operands): a 16-bit tree
        # rounds once per level and measured ~1.5x the bf16 error (dg 1.9e-2 vs 1.3e-2).
        self.tree_dtype = torch.float32 if TREE_FP32 or q.dtype == torch.float32 else q.dtype
        self.kv_pieces = max(1, min(KV_V_PIECES, self.BV_full // 16))  # _bwd_kv's V pieces
        self.q_pieces = max(1, min(Q_V_PIECES, self.BV_full // 16))  # _bwd_q's
        self.warps = 4 if max(self.BK, self.BV_full) <= 64 else 8
        # the backward's computed dot operands (see _mm): float32 inputs take float32 operands anyway;
        # fp16 hi + lo parts could overflow where a float32 state does not: TF32 there
        mode = 0 if q.dtype == torch.float32 else GRAD_OPERANDS
        self.grad_mode = 1 if mode == 2 and q.dtype == torch.float16 else mode

    def args(self) -> tuple:
        return (self.T, self.H, self.K, self.V, self.L, self.Tp)


def _decays(g: torch.Tensor, p: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """gl [B, H, Tp] in-chunk inclusive cumsum (float32); gch [B, H, n+1] exclusive chunk cumsum (float64)."""
    gp = torch.nn.functional.pad(g.float(), (0, 0, 0, p.Tp - p.T)).transpose(1, 2)  # [B, H, Tp]
    gl = gp.reshape(p.B, p.H, p.n, p.C).cumsum(-1)
    gch = torch.nn.functional.pad(gl[..., -1].double().cumsum(-1), (1, 0))
    return gl.reshape(p.B, p.H, p.Tp).contiguous(), gch.contiguous()


def _build_tree(k, v, gl, gch, p: _Plan) -> torch.Tensor:
    """Tree nodes (odd nodes below level p.S are never stored: no reader reads them)."""
    tree = torch.empty(p.B * p.H, p.X, p.K, p.V, device=k.device, dtype=p.tree_dtype)
    blocks = -(-p.n >> p.S)  # ceil(n / 2**S)
    _build_block[(blocks, p.B * p.H, p.NV_fwd)](k, v, gl, gch, tree, p.toff, p.T, p.H, p.K, p.V, p.Tp, p.n, p.X,
                                                S=p.S, C=p.C, BK=p.BK, BV=p.BV_fwd, PREC=p.prec, GM=p.grad_mode,
                                                num_warps=p.warps)
    toff = p.toff_list
    for j in range(p.S, p.J - 1):
        _combine[(p.counts[j + 1], p.B * p.H, -(-p.V // 32))](tree, gch, p.n, p.X, toff[j], toff[j + 1], p.counts[j],
                                                             j, p.K, p.V, BK=p.BK, BV=32, num_warps=4)
    return tree


def _forward(q, k, v, gl, lam, gch, scale, p: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    tree = _build_tree(k, v, gl, gch, p)
    o = torch.empty(p.B, p.T, p.H, p.V, device=q.device, dtype=q.dtype)
    _fwd[(p.n, p.B * p.H, p.NV_fwd)](q, k, v, gl, lam, gch, tree, p.toff, o, scale, *p.args(), p.n, p.X, p.J,
                                     C=p.C, CB=p.CB, BK=p.BK, BV=p.BV_fwd, PREC=p.prec, num_warps=p.warps)
    return o, tree


def _backward(q, k, v, gl, lam, gch, tree, do, scale, p: _Plan):
    dev = q.device
    BH = p.B * p.H
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dlam = torch.zeros(p.B, p.T, p.H, p.L, device=dev, dtype=torch.float32)
    dgq = torch.empty(p.B, p.H, p.Tp, device=dev, dtype=torch.float32)  # every row written (padding: 0)
    dgk = torch.empty(p.B, p.H, p.Tp, device=dev, dtype=torch.float32)
    _bwd_q[(p.n, BH)](q, k, v, do, gl, lam, gch, tree, p.toff, dq, dlam, dgq, scale, *p.args(), p.n, p.X, p.J,
                      C=p.C, CB=p.CB, BK=p.BK, BV=p.BV_full // p.q_pieces, NP=p.q_pieces, PREC=p.prec,
                      GM=p.grad_mode, num_warps=p.warps)
    # every row is written below before _bwd_kv reads it (it reads level j's block blk only where the
    # reader block 2 blk + 1 exists, i.e. blk < counts[j] // 2): no zero fill (1 GB at 64k tokens, 16 heads)
    direct = torch.empty(BH, max(p.Y, 1), p.K, p.V, device=dev, dtype=torch.float32)
    doff = p.doff_list
    for j in range(p.J):
        nblk = p.counts[j] // 2
        if nblk == 0:
            continue
        nseg = max(1, -(-(1 << j) // SEG))
        dst = direct[:, doff[j] : doff[j] + nblk]
        buf = dst if nseg == 1 else torch.empty(nseg, BH, nblk, p.K, p.V, device=dev, dtype=torch.float32)
        seg_stride = 0 if nseg == 1 else buf.stride(0)
        bh_stride = buf.stride(0) if nseg == 1 else buf.stride(1)
        _direct[(nblk * nseg, BH, p.NV)](q, do, gl, lam, gch, buf, scale, *p.args(), p.n, j, nseg, min(SEG, 1 << j),
                                         seg_stride, bh_stride, C=p.C, CB=p.CB, BK=p.BK, BV=p.BV, PREC=p.prec,
                                         GM=p.grad_mode, num_warps=p.warps)
        if nseg > 1:
            dst.copy_(buf.sum(0))
    _bwd_kv[(p.n, BH)](q, k, v, do, gl, lam, gch, direct, p.doff, dk, dv, dgk, scale, *p.args(), p.n,
                       direct.shape[1], p.J, C=p.C, CB=p.CB, BK=p.BK, BV=p.BV_full // p.kv_pieces, NP=p.kv_pieces,
                       PREC=p.prec, GM=p.grad_mode, num_warps=p.warps)
    dg = _dg_from_dgc(dgq - dgk)[..., : p.T].transpose(1, 2).to(torch.float32)
    return dq, dk, dv, dg, dlam


def _dg_from_dgc(dgc: torch.Tensor) -> torch.Tensor:
    """dg [..., T] from dGc = q.dq - k.dk (all decays are exp(Gc_t - Gc_s)).

    dg_t = sum_{r >= t} dGc_r, and as o only sees differences of Gc, sum_r dGc_r = 0, so also
    dg_t = -sum_{r < t} dGc_r. Each form differences two large sums where its range is long (the
    suffix counts all pairs with the query at or after t, minus those with the key there), so 16-bit
    rounding of the terms grows into a large error of the small result: use per position the form
    whose terms weigh less (in absolute value). Where the suffix form was worst (early positions of a
    long sequence) this cuts the bf16 error several times (T = 3000: 3.5% -> 1.6% overall)."""
    # float64 sums: the suffix as total minus prefix adds only float64 rounding, far below the terms'.
    dgc = dgc.double()
    mass = dgc.abs()
    both = torch.stack((dgc, mass)).cumsum(-1)
    prefix, prefix_mass = both[0] - dgc, both[1] - mass
    suffix, suffix_mass = both[0, ..., -1:] - prefix, both[1, ..., -1:] - prefix_mass
    return torch.where(prefix_mass < suffix_mass, -prefix, suffix)


class LogLinearSSD(torch.autograd.Function):
    """o = log-linear Mamba-2 of dense sequences starting at position 0 (see module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, g, lam, scale: float, chunk_size: int):
        q, k, v, lam = (x.contiguous() for x in (q, k, v, lam))
        p = _Plan(q, v, lam, chunk_size)
        gl, gch = _decays(g, p)
        lam_f = lam.float().contiguous()
        o, tree = _forward(q, k, v, gl, lam_f, gch, scale, p)
        ctx.save_for_backward(q, k, v, gl, lam_f, gch, tree)
        ctx.p, ctx.scale, ctx.dtypes = p, scale, (g.dtype, lam.dtype)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, gl, lam_f, gch, tree = ctx.saved_tensors
        dq, dk, dv, dg, dlam = _backward(q, k, v, gl, lam_f, gch, tree, do.contiguous(), ctx.scale, ctx.p)
        return dq, dk, dv, dg.to(ctx.dtypes[0]), dlam.to(ctx.dtypes[1]), None, None


def loglinear_ssd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, lam: torch.Tensor,
                  scale: float, chunk_size: int = 64) -> torch.Tensor:
    """Dense [B, T, H, D] inputs, all sequences starting at position 0; returns o [B, T, H, V]."""
    return LogLinearSSD.apply(q, k, v, g, lam, scale, chunk_size)
