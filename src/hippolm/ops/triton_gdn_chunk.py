"""The chunk-local parts of log-linear Gated DeltaNet as fused Triton kernels (one program per chunk
and head): the forward reads q, k, v, g, beta, lam once and writes the WY factors the tree kernels
take (w, u, kd, qw, ge) and the chunk's own output; the backward (two kernels) recomputes the masks
and products from the inputs and the saved inverse, and writes dq, dk, dv, dg, dbeta, dlam once.
(They replace ~20 batched torch ops and their autograd, each a pass over memory.)

Per chunk (C tokens, G the within-chunk cumulative log decay, gamma = exp(G), qb = q * scale):

    decay_ij = exp(G_i - G_j) (i >= j)      A = I + strict_lower(beta_i (k k^T)_ij decay_ij)
    mix = A^-1 diag(beta)                    w = mix (gamma k),  u = mix v,  kd = k exp(G_C - G)
    attn = (qb k^T) * decay                  qw = qb gamma - attn w
    o = ((attn mix) * lam_in) v              lam_in_ij = lam_i[bit_length(i xor j)]

A^-1 (:func:`_inverse`): forward substitution inside the 16 x 16 diagonal blocks, then pairs of
blocks merged (no long products of powers of the nilpotent part: those overflow float32's
precision when keys are alike). Only loaded tiles are transposed inside a dot (Triton miscompiles
the transpose of a dot's result on Hopper, FLA #640); computed matrices go through a scratch, or
to the backward's second kernel, which loads them transposed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference


@triton.jit
def _dot(a, b, acc, DT: tl.constexpr, PREC: tl.constexpr):
    """a @ b (+ acc) with both operands in DT (16-bit for 16-bit inputs, as FLA) and float32 sums."""
    return tl.dot(a.to(DT), b.to(DT), acc, input_precision=PREC)


@triton.jit
def _transposed(x, scr_ptr, C: tl.constexpr):
    """x^T of a computed [C, C] float32 tile, through this program's scratch."""
    cc = tl.arange(0, C)
    tl.debug_barrier()  # earlier reads of the scratch are done
    tl.store(scr_ptr + cc[:, None] * C + cc[None, :], x)
    tl.debug_barrier()
    return tl.load(scr_ptr + cc[None, :] * C + cc[:, None])


@triton.jit
def _rows(pid, n, H, C: tl.constexpr):
    """Program pid = (sequence * H + head) * n + chunk: its chunk's [C] offsets into [N, n*C, H]."""
    bh = pid // n
    cc = tl.arange(0, C)
    return ((bh // H) * n * C + (pid % n) * C + cc) * H + bh % H


@triton.jit
def _chunk_program(n, H, C: tl.constexpr):
    """(pid, its chunk's token rows, cc = arange(C), cc as rows, cc as columns) of a program per chunk."""
    pid = tl.program_id(0).to(tl.int64)
    cc = tl.arange(0, C)
    return pid, _rows(pid, n, H, C), cc, cc[:, None], cc[None, :]


@triton.jit
def _gates(g_ptr, b_ptr, tok, C: tl.constexpr):
    """(gamma = exp(G), exp(G_C - G), G_C, beta) with G the within-chunk cumulative log decay."""
    cc = tl.arange(0, C)
    G = tl.cumsum(tl.load(g_ptr + tok).to(tl.float32), axis=0)
    GL = tl.sum(tl.where(cc == C - 1, G, 0.0), axis=0)
    return tl.exp(G), tl.exp(GL - G), GL, tl.load(b_ptr + tok).to(tl.float32)


@triton.jit
def _decay(g_ptr, tok, C: tl.constexpr):
    """[C, C] exp(G_i - G_j) for i >= j, 0 above the diagonal. The backward makes it where used, from
    g re-read (a load the compiler does not merge with the last one across the stores between):
    cheaper than a [C, C] tile kept live, i.e. spilled, across the kernel."""
    cc = tl.arange(0, C)
    G = tl.cumsum(tl.load(g_ptr + tok).to(tl.float32), axis=0)
    lower = cc[:, None] >= cc[None, :]
    return tl.where(lower, tl.exp(tl.where(lower, G[:, None] - G[None, :], 0.0)), 0.0)


@triton.jit
def _levels(lam_ptr, tok, L, C: tl.constexpr, CB: tl.constexpr):
    """(level of every pair (i, j) = bit_length(i xor j), lam_i at that level (0 beyond L))."""
    cc = tl.arange(0, C)
    x = cc[:, None] ^ cc[None, :]
    lvl = tl.zeros((C, C), dtype=tl.int32)
    for b in tl.static_range(CB):
        lvl += ((x >> b) > 0).to(tl.int32)
    lam = tl.zeros((C, C), dtype=tl.float32)
    for lv in tl.static_range(CB + 1):
        col = tl.load(lam_ptr + tok * L + lv, mask=(cc * 0 + lv) < L, other=0).to(tl.float32)
        lam = tl.where(lvl == lv, col[:, None], lam)
    return lvl, lam


@triton.jit
def _gram(a_ptr, b_ptr, tok, K, C: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """a b^T of the chunk's rows of two [*, K] inputs, [C, C] float32."""
    out = tl.zeros((C, C), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        m = kk[None, :] < K
        at = tl.load(a_ptr + tok[:, None] * K + kk[None, :], mask=m, other=0)
        bt = tl.load(b_ptr + tok[:, None] * K + kk[None, :], mask=m, other=0)
        out = _dot(at, tl.trans(bt), out, DT, PREC)
    return out


@triton.jit
def _merge_pairs(ap, C: tl.constexpr, S: tl.constexpr, P: tl.constexpr):
    """In the [C, C] scratch ``ap`` of a unit lower triangular A whose S x S diagonal blocks already
    hold their inverses (the blocks below them: A's own entries), make the 2S x 2S diagonal blocks'
    inverses: each pair's lower-left block becomes -A22^-1 A21 A11^-1."""
    ss = tl.arange(0, S)
    r, c = ss[:, None], ss[None, :]
    for p in tl.static_range(C // (2 * S)):
        o = 2 * p * S  # the pair's first row and column
        a11 = tl.load(ap + (o + r) * C + o + c)
        a21 = tl.load(ap + (o + S + r) * C + o + c)
        a22 = tl.load(ap + (o + S + r) * C + o + S + c)
        x = -tl.dot(tl.dot(a22, a21, input_precision=P), a11, input_precision=P)
        tl.debug_barrier()  # every thread has read a21 before it is overwritten
        tl.store(ap + (o + S + r) * C + o + c, x)
    tl.debug_barrier()


@triton.jit
def _inverse(Lm, ap, C: tl.constexpr, SOLVE: tl.constexpr, PREC: tl.constexpr):
    """(I + Lm)^-1 of a strictly lower [C, C] Lm (``ap``: this program's [C, C] scratch).

    "rows": forward substitution, T = A^-1 - I row by row, T_r = -L_r - sum_{j<r} L_rj T_j (C - 1
    dependent steps). "merge": the same inside the 16 x 16 diagonal blocks, all at once as vector work
    on their [C / 16, 16, 16] stack (15 steps), then pairs of blocks merged 16 -> 32 -> 64
    (:func:`_merge_pairs`: two S^3 products per pair, 3xTF32 where PREC is TF32). "merge_loads": the
    same, each step's row of L loaded from the scratch and the blocks held transposed as a [C, 16] tile
    so the step's one sum stays within a warp (sm_90: 84 barriers instead of 202, 5592 instructions
    instead of 6720; the default: forward 2.26 -> 1.73 ms on the H100 at 64k x 16 heads,
    chunk_timing_h100_merge_loads.json). An earlier way took
    each step as a masked [C, C] product and crossed blocks by the series (I - N + N^2 - N^3) D^-1:
    19 3xTF32 products of C^3 (forward 3.38 vs 2.29 ms on the H100, chunk_timing_h100_merge.json)."""
    cc = tl.arange(0, C)
    ri, cj = cc[:, None], cc[None, :]
    if SOLVE == "rows":
        tl.store(ap + ri * C + cj, Lm)
        tl.debug_barrier()
        T = tl.zeros((C, C), dtype=tl.float32)
        for r in range(1, C):
            a = -tl.load(ap + r * C + cc, mask=cc < r, other=0.0)
            a += tl.sum(a[:, None] * T, axis=0)
            T = tl.where(ri == r, a[None, :], T)
        tl.debug_barrier()  # the scratch is read; the caller may overwrite it
        return T + (ri == cj).to(tl.float32)
    P: tl.constexpr = "tf32x3" if PREC == "tf32" else PREC
    tl.debug_barrier()  # earlier reads of the scratch are done
    tl.store(ap + ri * C + cj, Lm)
    tl.debug_barrier()
    if SOLVE == "merge_loads":
        # T^T of every block as rows (b, col) of a [C, 16] tile, T^T[(b, col), j] = T_b[j, col]: each step
        # reduces along the tile's rows (within a warp), and row r of L comes from the scratch, loaded
        # in the layout each use needs (the [NB, 16, 16] stack's reductions crossed warps: ncu_chunk_h100.json)
        b0 = (cc // 16) * 16  # the block's first row and column, per tile row
        jv = tl.arange(0, 16)
        TT = tl.zeros((C, 16), dtype=tl.float32)
        for r in tl.static_range(1, 16):
            row = ap + (b0 + r) * C + b0  # row r of the tile row's block of L (zero from column r on)
            s = tl.sum(tl.load(row[:, None] + jv[None, :]) * TT, axis=1)  # sum_j L_rj T_j[col]
            TT = tl.where(jv[None, :] == r, -(tl.load(row + cc % 16) + s)[:, None], TT)
        tl.debug_barrier()
        tl.store(ap + (b0[:, None] + jv[None, :]) * C + cc[:, None], TT + ((cc % 16)[:, None] == jv[None, :]))
    else:
        NB: tl.constexpr = C // 16
        bb = tl.arange(0, NB)[:, None, None]
        ii = tl.arange(0, 16)[None, :, None]
        jj = tl.arange(0, 16)[None, None, :]
        blk = ap + (bb * 16 + ii) * C + bb * 16 + jj  # the diagonal blocks of the scratch, [NB, 16, 16]
        Lb = tl.load(blk)
        Tb = tl.zeros((NB, 16, 16), dtype=tl.float32)
        for r in tl.static_range(1, 16):
            a = -tl.sum(tl.where(ii == r, Lb, 0.0), axis=1)  # row r of every block (zero from column r on)
            a += tl.sum(a[:, :, None] * Tb, axis=1)
            Tb = tl.where(ii == r, a[:, None, :], Tb)
        tl.debug_barrier()
        tl.store(blk, Tb + (ii == jj).to(tl.float32))
    tl.debug_barrier()
    if C >= 32:
        _merge_pairs(ap, C, 16, P)
    if C >= 64:
        _merge_pairs(ap, C, 32, P)
    out = tl.load(ap + ri * C + cj)  # above the diagonal: Lm's zeros
    tl.debug_barrier()  # the scratch is read; the caller may overwrite it
    return out


@triton.jit
def _chunk_fwd(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, lam_ptr, a_ptr, w_ptr, u_ptr, kd_ptr, qw_ptr, ge_ptr, o_ptr,
               scale, n, H, K, V, L, C: tl.constexpr, CB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               SOLVE: tl.constexpr, PREC: tl.constexpr):
    """One chunk and head: A^-1 into ``a`` (saved for the backward), w, u, kd, qw ([N, H, n, C, *],
    the inputs' type), ge, and the chunk's own output o (the inputs' [N, length, H, V] layout, o's type)."""
    pid, tok, cc, ri, cj = _chunk_program(n, H, C)
    DT = q_ptr.dtype.element_ty
    gam, ekd, GL, beta = _gates(g_ptr, b_ptr, tok, C)
    # A^-1 first, then q k^T: no [C, C] tile of the scores live through the solve (registers)
    Lm = tl.where(ri > cj, beta[:, None] * _gram(k_ptr, k_ptr, tok, K, C, BK, DT, PREC) * _decay(g_ptr, tok, C), 0.0)
    Ainv = _inverse(Lm, a_ptr + pid * C * C, C, SOLVE, PREC)
    tl.store(a_ptr + pid * C * C + ri * C + cj, Ainv)
    mix = Ainv * beta[None, :]
    attn = _gram(q_ptr, k_ptr, tok, K, C, BK, DT, PREC) * scale * _decay(g_ptr, tok, C)
    _, lam = _levels(lam_ptr, tok, L, C, CB)
    M = _dot(attn, mix, None, DT, PREC) * lam
    rows = pid * C + cc  # rows of [N * H * n * C, *]
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        m = kk[None, :] < K
        kt = tl.load(k_ptr + tok[:, None] * K + kk[None, :], mask=m, other=0).to(tl.float32)
        qt = tl.load(q_ptr + tok[:, None] * K + kk[None, :], mask=m, other=0).to(tl.float32)
        w = _dot(mix, kt * gam[:, None], None, DT, PREC)
        qw = qt * (scale * gam)[:, None] - _dot(attn, w, None, DT, PREC)
        out = rows[:, None] * K + kk[None, :]
        tl.store(w_ptr + out, w, mask=m)
        tl.store(qw_ptr + out, qw, mask=m)
        tl.store(kd_ptr + out, kt * ekd[:, None], mask=m)
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        m = vv[None, :] < V
        tv = tok[:, None] * V + vv[None, :]  # v's and o's offsets
        vt = tl.load(v_ptr + tv, mask=m, other=0)
        tl.store(u_ptr + rows[:, None] * V + vv[None, :], _dot(mix, vt, None, DT, PREC), mask=m)
        tl.store(o_ptr + tv, _dot(M, vt, None, DT, PREC), mask=m)
    tl.store(ge_ptr + pid, tl.exp(GL))


@triton.jit
def _chunk_bwd(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, lam_ptr, a_ptr, do_ptr, dw_ptr, du_ptr, dkd_ptr, dqw_ptr,
               dge_ptr, dmix_ptr, scr_ptr, cc_ptr, dgp_ptr, dv_ptr, db_ptr, dlam_ptr,
               scale, n, H, K, V, L, C: tl.constexpr, CB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               HAS_DMIX: tl.constexpr, PREC: tl.constexpr):
    """Gradients of :func:`_chunk_fwd` for one chunk and head, from those of o, w, u, kd, qw, ge and
    (HAS_DMIX) mix, but dq, dk and dg: dv, dbeta, dlam, and for :func:`_chunk_bwd_qk` attn, dS = dattn
    * decay and dKK = dL * beta * decay (the operand type, in ``cc`` [3, N * H * n, C, C]) and the decay
    gradient so far (``dgp``). With X = dqw (gamma k)^T: dattn = (dP - X) mix^T, dw_total = dw - attn^T
    dqw, dmix = du v^T + attn^T dP + dw_total (gamma k)^T, dA = -A^-T (dmix diag(beta)) A^-T.
    Two kernels, not one: the second loads dS and dKK transposed where this one would transpose them
    through a scratch, and neither spills (one kernel: 272-288 bytes of stack on sm_90; H100, 64k
    tokens x 16 heads, chunk_timing_h100_split.json: 5.39 ms for both vs 6.48)."""
    pid, tok, cc, ri, cj = _chunk_program(n, H, C)
    DT = q_ptr.dtype.element_ty
    gam, _, _, beta = _gates(g_ptr, b_ptr, tok, C)
    # Each [C, C] tile is made where it is first needed and dropped after its last use (A^-1 is
    # re-read, K K^T recomputed at the end): fewer tiles live at once, fewer registers spilled.
    ap = a_ptr + pid * C * C
    scr = scr_ptr + pid * C * C
    rows = pid * C + cc
    attn = _gram(q_ptr, k_ptr, tok, K, C, BK, DT, PREC) * scale * _decay(g_ptr, tok, C)
    _, lam = _levels(lam_ptr, tok, L, C, CB)
    MT = _transposed(_dot(attn, tl.load(ap + ri * C + cj) * beta[None, :], None, DT, PREC) * lam, scr, C)
    mixT = tl.load(ap + cj * C + ri) * beta[:, None]
    dM = tl.zeros((C, C), dtype=tl.float32)
    dmix = tl.load(dmix_ptr + pid * C * C + ri * C + cj) if HAS_DMIX else tl.zeros((C, C), dtype=tl.float32)
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        m = vv[None, :] < V
        tv = tok[:, None] * V + vv[None, :]  # v's, do's and dv's offsets
        vt = tl.load(v_ptr + tv, mask=m, other=0)
        do = tl.load(do_ptr + tv, mask=m, other=0)
        du = tl.load(du_ptr + rows[:, None] * V + vv[None, :], mask=m, other=0)
        dM = _dot(do, tl.trans(vt), dM, DT, PREC)
        dmix = _dot(du, tl.trans(vt), dmix, DT, PREC)
        dv = _dot(mixT, du, _dot(MT, do, None, DT, PREC), DT, PREC)
        tl.store(dv_ptr + tv, dv, mask=m)
    lvl, lam = _levels(lam_ptr, tok, L, C, CB)  # again, and attn mix: not kept through the loop above
    dlam_in = dM * _dot(attn, tl.load(ap + ri * C + cj) * beta[None, :], None, DT, PREC)
    for lv in tl.static_range(CB + 1):
        tl.store(dlam_ptr + tok * L + lv, tl.sum(tl.where(lvl == lv, dlam_in, 0.0), axis=1), mask=(cc * 0 + lv) < L)
    dP = dM * lam
    X = tl.zeros((C, C), dtype=tl.float32)
    dgam = tl.zeros((C,), dtype=tl.float32)  # gradient of gamma
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        m = kk[None, :] < K
        kt = tl.load(k_ptr + tok[:, None] * K + kk[None, :], mask=m, other=0).to(tl.float32)
        qt = tl.load(q_ptr + tok[:, None] * K + kk[None, :], mask=m, other=0).to(tl.float32)
        dqw = tl.load(dqw_ptr + rows[:, None] * K + kk[None, :], mask=m, other=0).to(tl.float32)
        X = _dot(dqw, tl.trans(kt * gam[:, None]), X, DT, PREC)
        dgam += tl.sum(dqw * qt, axis=1) * scale
    dattn = _dot(dP - X, mixT, None, DT, PREC)
    attnT = _transposed(attn, scr, C)
    dmix = _dot(attnT, dP, dmix, DT, PREC)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        m = kk[None, :] < K
        kt = tl.load(k_ptr + tok[:, None] * K + kk[None, :], mask=m, other=0)
        dw = tl.load(dw_ptr + rows[:, None] * K + kk[None, :], mask=m, other=0).to(tl.float32)
        dqw = tl.load(dqw_ptr + rows[:, None] * K + kk[None, :], mask=m, other=0)
        dw_total = dw - _dot(attnT, dqw, None, DT, PREC)
        dmix = _dot(dw_total, tl.trans(kt.to(tl.float32) * gam[:, None]), dmix, DT, PREC)
    # through mix = A^-1 diag(beta) and A = I + strict_lower(beta_i KK_ij decay_ij)
    db = tl.sum(dmix * tl.load(ap + ri * C + cj), axis=0)
    AinvT = tl.load(ap + cj * C + ri)
    dA = -tl.dot(tl.dot(AinvT, dmix * beta[None, :], input_precision=PREC), AinvT, input_precision=PREC)
    KKd = tl.where(ri > cj, _gram(k_ptr, k_ptr, tok, K, C, BK, DT, PREC) * _decay(g_ptr, tok, C), 0.0)
    dL = tl.where(ri > cj, dA, 0.0)
    db += tl.sum(dL * KKd, axis=1)
    E = dL * KKd * beta[:, None] + dattn * attn  # d(G_i - G_j) of every decayed entry
    dG = tl.sum(E, axis=1) - tl.sum(E, axis=0)
    dKK = dL * beta[:, None] * _decay(g_ptr, tok, C)
    dS = dattn * _decay(g_ptr, tok, C)
    NC = tl.num_programs(0).to(tl.int64) * C * C  # one [N * H * n, C, C] part of cc
    tile = pid * C * C + ri * C + cj
    tl.store(cc_ptr + tile, attn.to(cc_ptr.dtype.element_ty))
    tl.store(cc_ptr + NC + tile, dS.to(cc_ptr.dtype.element_ty))
    tl.store(cc_ptr + 2 * NC + tile, dKK.to(cc_ptr.dtype.element_ty))
    tl.store(dgp_ptr + pid * C + cc, dG + dgam * gam)
    tl.store(db_ptr + tok, db)


@triton.jit
def _chunk_bwd_qk(q_ptr, k_ptr, g_ptr, b_ptr, a_ptr, dw_ptr, dkd_ptr, dqw_ptr, dge_ptr, cc_ptr, dgp_ptr,
                  dq_ptr, dk_ptr, dg_ptr, scale, n, H, K, C: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """The rest of :func:`_chunk_bwd` for one chunk and head: dq, dk and the decay gradient, from
    attn, dS and dKK in ``cc`` (loaded transposed where the transposes are needed)."""
    pid, tok, cc, ri, cj = _chunk_program(n, H, C)
    DT = q_ptr.dtype.element_ty
    gam, ekd, GL, beta = _gates(g_ptr, b_ptr, tok, C)
    NC = tl.num_programs(0).to(tl.int64) * C * C
    tile, tileT = pid * C * C + ri * C + cj, pid * C * C + cj * C + ri
    mixT = tl.load(a_ptr + tileT) * beta[:, None]
    attnT = tl.load(cc_ptr + tileT)
    dS, dST = tl.load(cc_ptr + NC + tile), tl.load(cc_ptr + NC + tileT)
    rows = pid * C + cc
    dKK = tl.load(cc_ptr + 2 * NC + tile).to(tl.float32) + tl.load(cc_ptr + 2 * NC + tileT).to(tl.float32)
    dgam = tl.zeros((C,), dtype=tl.float32)
    t = tl.zeros((C,), dtype=tl.float32)  # kd's decay exp(G_C - G): -t on each row, +sum(t) on G_C
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        m = kk[None, :] < K
        kt = tl.load(k_ptr + tok[:, None] * K + kk[None, :], mask=m, other=0)
        qt = tl.load(q_ptr + tok[:, None] * K + kk[None, :], mask=m, other=0)
        dw = tl.load(dw_ptr + rows[:, None] * K + kk[None, :], mask=m, other=0).to(tl.float32)
        dqw = tl.load(dqw_ptr + rows[:, None] * K + kk[None, :], mask=m, other=0)
        dkd = tl.load(dkd_ptr + rows[:, None] * K + kk[None, :], mask=m, other=0).to(tl.float32)
        dkg = _dot(mixT, dw - _dot(attnT, dqw, None, DT, PREC), None, DT, PREC)  # of gamma k
        dq = (dqw.to(tl.float32) * gam[:, None] + _dot(dS, kt, None, DT, PREC)) * scale
        dk = dkg * gam[:, None] + dkd * ekd[:, None] + _dot(dST, qt, None, DT, PREC) * scale
        dk = _dot(dKK, kt, dk, DT, PREC)
        kf = kt.to(tl.float32)
        dgam += tl.sum(dkg * kf, axis=1)
        t += tl.sum(dkd * kf * ekd[:, None], axis=1)
        tl.store(dq_ptr + tok[:, None] * K + kk[None, :], dq, mask=m)
        tl.store(dk_ptr + tok[:, None] * K + kk[None, :], dk, mask=m)
    dGL = tl.sum(t, axis=0) + tl.load(dge_ptr + pid) * tl.exp(GL)
    dG = tl.load(dgp_ptr + pid * C + cc) - t + dgam * gam + tl.where(cc == C - 1, dGL, 0.0)
    tl.store(dg_ptr + tok, tl.sum(dG, axis=0) - tl.cumsum(dG, axis=0) + dG)  # suffix sums


# Per kernel: K and V columns per step of its loops, warps, stages, and (forward) the solve for A^-1.
# H200, bf16, 64k tokens, 16 heads (benchmarks/chunk_timing.py, chunk_timing_h200.json): forward
# (the old block solve) with 4 warps 3.4 ms (8 warps 7.0, "rows" 3.9 / 4.8), backward 8 warps 8.1 ms
# (4 warps 9.3). H100 (chunk_timing_h100_merge.json): forward "merge" 2.29 ms, "rows" 4.15; there
# (ncu_chunk_h100.json) the 15 substitution steps' cross-warp sums were ~30% of the forward's stall
# samples, which "merge_loads" avoids (1.73 vs 2.26 ms, chunk_timing_h100_merge_loads.json).
# 32-column steps compute wrong results there (Triton 3.6; the backward always, the forward with
# the old block solve) and 16 columns an illegal address, while the interpreter agrees with the reference:
# _blocks keeps steps at 64 columns (K, V below 64 are masked). qk_warps: the backward's second kernel
# (chunk_timing_h100_split.json, a variant that also made dv there: 4 warps 5.46 ms for both kernels,
# 8 warps 6.12). Tried and dropped: the first kernel's V side (dv, dlam) as a launch of its own, dP and
# dmix handed over in float32 (255 registers at 4 warps, no stack): 5.77 ms for the three kernels vs 5.27,
# 6.45 with the V side at 8 warps (chunk_timing_h100_vside.json).
CHUNK_TILES = {"fwd": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 1, "solve": "merge_loads"},
               "bwd": {"BK": 64, "BV": 64, "num_warps": 8, "num_stages": 1, "qk_warps": 4}}


class ChunkParts(torch.autograd.Function):
    """(q, k, v [N, length, H, *], g, beta [N, length, H], lam [N, length, H, L]; length = n * C)
    -> (w, u, kd, qw [N, H, n, C, *] in q's type, ge [N, H, n], o [N, length, H, V] in ``o_dtype``: the
    chunk's own output with level weights lam[..., :log2(C)+1], in the layout of the op's output, so
    its gradient is the op's output gradient as it comes (no copy), mix [N, H, n, C, C] if ``want_mix``
    else empty)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, lam, scale: float, C: int, want_mix: bool, prec: str, o_dtype: torch.dtype):
        q, k, v, g, beta, lam = (x.contiguous() for x in (q, k, v, g, beta, lam))
        N, length, H, K = q.shape
        V, L, n = v.shape[-1], lam.shape[-1], length // C
        ainv = q.new_empty(N, H, n, C, C, dtype=torch.float32)
        w, kd, qw = (q.new_empty(N, H, n, C, K) for _ in range(3))
        u = q.new_empty(N, H, n, C, V)
        o = q.new_empty(N, length, H, V, dtype=o_dtype)
        ge = q.new_empty(N, H, n, dtype=torch.float32)
        BK, BV = _blocks(K, V, "fwd")
        _chunk_fwd[(N * H * n,)](q, k, v, g, beta, lam, ainv, w, u, kd, qw, ge, o, scale, n, H, K, V, L,
                                 C=C, CB=C.bit_length() - 1, BK=BK, BV=BV,
                                 SOLVE=CHUNK_TILES["fwd"]["solve"], PREC=prec, **_launch("fwd"))
        ctx.save_for_backward(q, k, v, g, beta, lam, ainv)
        ctx.scale, ctx.prec = scale, prec
        mix = ainv * reference.to_blocks(beta.float(), C)[..., None, :] if want_mix else ainv.new_empty(0)
        return w, u, kd, qw, ge, o, mix

    @staticmethod
    def backward(ctx, dw, du, dkd, dqw, dge, do, dmix):
        q, k, v, g, beta, lam, ainv = ctx.saved_tensors
        N, _, H, K = q.shape
        V, L = v.shape[-1], lam.shape[-1]
        n, C = ainv.shape[2], ainv.shape[-1]
        dw, du, dkd, dqw, dge, do = (x.contiguous() for x in (dw, du, dkd, dqw, dge, do))
        has_dmix = dmix.numel() > 0
        dq, dk, dv, dg, db = (torch.empty_like(x) for x in (q, k, v, g, beta))
        dlam = torch.zeros_like(lam)  # the chunk levels' columns come from the tree
        scratch = torch.empty_like(ainv)
        BK, BV = _blocks(K, V, "bwd")
        cc = q.new_empty(3, *ainv.shape)  # attn, dS, dKK in the operand type (what the dots of dq, dk take)
        dgp = g.new_empty(N, H, n, C, dtype=torch.float32)
        _chunk_bwd[(N * H * n,)](q, k, v, g, beta, lam, ainv, do, dw, du, dkd, dqw, dge,
                                 dmix.contiguous() if has_dmix else ainv, scratch, cc, dgp, dv, db, dlam, ctx.scale,
                                 n, H, K, V, L, C=C, CB=C.bit_length() - 1, BK=BK, BV=BV, HAS_DMIX=has_dmix,
                                 PREC=ctx.prec, **_launch("bwd"))
        _chunk_bwd_qk[(N * H * n,)](q, k, g, beta, ainv, dw, dkd, dqw, dge, cc, dgp, dq, dk, dg, ctx.scale, n, H, K,
                                    C=C, BK=BK, PREC=ctx.prec, num_warps=CHUNK_TILES["bwd"]["qk_warps"],
                                    num_stages=CHUNK_TILES["bwd"]["num_stages"])
        return dq, dk, dv, dg, db, dlam, None, None, None, None, None


def _blocks(K: int, V: int, which: str) -> tuple[int, int]:
    """Columns per step of the K and V loops: 64 (see CHUNK_TILES), whatever the head dims."""
    cfg = CHUNK_TILES[which]
    return max(64, min(cfg["BK"], triton.next_power_of_2(K))), max(64, min(cfg["BV"], triton.next_power_of_2(V)))


def _launch(which: str) -> dict:
    return {"num_warps": CHUNK_TILES[which]["num_warps"], "num_stages": CHUNK_TILES[which]["num_stages"]}
