"""FLA's gated chunk kernels for training on Hopper with Triton 3.4-3.7.0, with our own kernel for
the one step FLA refuses there.

FLA 0.6.0 raises in ``chunk_bwd_dqkwg`` with a gate on Hopper with Triton in [3.4, 3.7.1) (FLA
#640: Triton miscompiles ``tl.dot(tl.trans(ds), q)`` when ``ds`` comes out of a ``tl.dot``), which
takes down the backward of ``chunk_simple_gla`` (Mamba-2 / SSD) and ``chunk_gated_delta_rule``
(Gated DeltaNet). Every other kernel of those backwards is FLA's; :func:`_dqkwg` computes the
same quantities without that pattern: dk is accumulated transposed (``dk^T = dh v^T + q^T ds``),
so no operand of a ``tl.dot`` is a transposed accumulator.

Per chunk, with FLA's layouts (g: within-chunk cumulative log decay in log2 units, h: the state at
the chunk start, dh: the gradient of the state at its end, v: the values the chunk writes and
reads (Gated DeltaNet: the corrected pseudo-values v_new), dv: the gradient of v_new):

    dq = scale (2^g * do h^T + tril(do v^T * 2^(g_i - g_j)) k)
    dk = 2^(g_last - g) * v dh^T + (scale tril(do v^T * 2^(g_i - g_j)))^T q
    dw = -dv h^T                                     (Gated DeltaNet only: v_new = u - w h)
    dg = rowsum(dq q) - rowsum(dk k), plus 2^g_last sum(h dh) + sum(k * v dh^T 2^(g_last - g))
         at the chunk's last row (gradient of the natural-log cumulative decay, before FLA's
         reverse cumsum turns it into the gradient of g).

Imported lazily, only where FLA and Triton are installed (CUDA, or CPU under Triton's interpreter
for :func:`dqkwg`).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

CHUNK = 64
# Tile and launch settings of _dqkwg, fixed rather than autotuned (a tuner could pick a config that
# Triton miscompiles on Hopper, as FLA #984 found for num_warps=4 in another kernel): the fastest of
# 18 on an H100 at 64k tokens, 16 heads, d=128 (1.98 ms vs 2.64 for 4 warps, 2 stages;
# benchmarks/results/gdn_profile_h100.json), and the one the CUDA tests run.
CONFIG = {"BK": 128, "BV": 64, "num_warps": 8, "num_stages": 3}


@triton.jit(do_not_specialize=["T", "total"])
def _dqkwg(q, k, v, g, h, do, dh, dv, dq, dk, dw, dg, cu_seqlens, chunk_indices, scale, T, total,
           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
           BV: tl.constexpr, NK: tl.constexpr, VARLEN: tl.constexpr, HAS_DW: tl.constexpr):
    """One (chunk, K block) of one (sequence, head); dg is this K block's partial sum."""
    pid = tl.program_id(0)
    i_k, i_c = pid % NK, pid // NK
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    if VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
        i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        length = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        chunk = i_c.to(tl.int64)
    else:
        i_t = i_c.to(tl.int64)
        bos = i_b * T
        length = T
        chunk = i_b * tl.cdiv(T, BT) + i_t
    t = i_t * BT + tl.arange(0, BT)
    mt = t < length
    last = tl.minimum(i_t * BT + BT, length) - 1
    kk = i_k * BK + tl.arange(0, BK)
    mk = kk < K
    rows = (bos + t) * H + i_h  # token-head rows of the [B, T, H, *] tensors
    state = (chunk * H + i_h) * K * V

    ds = tl.zeros([BT, BT], dtype=tl.float32)
    dq_acc = tl.zeros([BT, BK], dtype=tl.float32)
    dkt = tl.zeros([BK, BT], dtype=tl.float32)  # dk transposed
    dw_acc = tl.zeros([BT, BK], dtype=tl.float32)
    hdh = tl.zeros([1], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        vv = i_v * BV + tl.arange(0, BV)
        mtv = mt[:, None] & (vv < V)[None, :]
        mkv = mk[:, None] & (vv < V)[None, :]
        b_v = tl.load(v + rows[:, None] * V + vv[None, :], mask=mtv, other=0)
        b_do = tl.load(do + rows[:, None] * V + vv[None, :], mask=mtv, other=0)
        b_h = tl.load(h + state + kk[:, None] * V + vv[None, :], mask=mkv, other=0)
        b_dh = tl.load(dh + state + kk[:, None] * V + vv[None, :], mask=mkv, other=0)
        hdh += tl.sum(tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1), axis=0)
        ds = tl.dot(b_do, tl.trans(b_v), ds)
        dq_acc = tl.dot(b_do, tl.trans(b_h.to(b_do.dtype)), dq_acc)
        dkt = tl.dot(b_dh.to(b_v.dtype), tl.trans(b_v), dkt)
        if HAS_DW:
            b_dv = tl.load(dv + rows[:, None] * V + vv[None, :], mask=mtv, other=0)
            dw_acc = tl.dot(b_dv.to(b_v.dtype), tl.trans(b_h.to(b_v.dtype)), dw_acc)

    tk = rows[:, None] * K + kk[None, :]  # [BT, BK] offsets
    tk_t = rows[None, :] * K + kk[:, None]  # [BK, BT] offsets (transposed view)
    mtk = mt[:, None] & mk[None, :]
    mkt = mk[:, None] & mt[None, :]
    if HAS_DW:
        tl.store(dw + tk, (-dw_acc).to(dw.dtype.element_ty), mask=mtk)
    b_q = tl.load(q + tk, mask=mtk, other=0)
    b_k = tl.load(k + tk, mask=mtk, other=0)
    b_kt = tl.load(k + tk_t, mask=mkt, other=0)
    b_g = tl.load(g + rows, mask=mt, other=0)
    g_last = tl.load(g + (bos + last) * H + i_h)

    dq_acc = dq_acc * tl.exp2(b_g)[:, None] * scale
    dkt = dkt * tl.where(mt, tl.exp2(g_last - b_g), 0)[None, :]
    dg_last = hdh * tl.exp2(g_last) + tl.sum(tl.sum(dkt * b_kt.to(tl.float32), axis=1), axis=0)
    causal = (t[:, None] >= t[None, :]) & mt[:, None] & mt[None, :]
    ds = tl.where(causal, ds * tl.exp2(b_g[:, None] - b_g[None, :]), 0) * scale
    ds = ds.to(b_k.dtype)
    dq_acc = tl.dot(ds, b_k, dq_acc)
    dkt = tl.dot(tl.trans(b_q), ds, dkt)  # the transposed loaded q, never a transposed accumulator
    dg_row = tl.sum(dq_acc * b_q.to(tl.float32), axis=1) - tl.sum(dkt * b_kt.to(tl.float32), axis=0)
    dg_row = tl.where(t == last, dg_row + dg_last, dg_row)
    tl.store(dq + tk, dq_acc.to(dq.dtype.element_ty), mask=mtk)
    tl.store(dk + tk_t, dkt.to(dk.dtype.element_ty), mask=mkt)
    tl.store(dg + i_k * total + rows, dg_row, mask=mt)


def dqkwg(q, k, v, g, h, do, dh, scale: float, cu_seqlens=None, chunk_indices=None, dv=None,
          chunk_size: int = CHUNK, config: dict | None = None):
    """dq, dk, dw (None without ``dv``) and dg (float32, before the reverse cumsum) of one gated chunk
    backward; shapes as FLA's: q, k [B, T, H, K], v, do, dv [B, T, H, V], g [B, T, H] (within-chunk
    cumsum, log2 units), h, dh [B, NT, H, K, V]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if (cu_seqlens is None) != (chunk_indices is None):
        raise ValueError("dqkwg: pass cu_seqlens and chunk_indices together (FLA's prepare_chunk_indices)")
    config = {**CONFIG, **(config or {})}
    BK = min(config["BK"], max(16, triton.next_power_of_2(K)))
    BV = min(config["BV"], max(16, triton.next_power_of_2(V)))
    NK = triton.cdiv(K, BK)
    n_chunks = triton.cdiv(T, chunk_size) if cu_seqlens is None else chunk_indices.numel() // 2  # [NT, 2] pairs
    q, k, v, g, h, do, dh = (x.contiguous() for x in (q, k, v, g, h, do, dh))
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dw = None if dv is None else torch.empty_like(k)
    dg = torch.empty(NK, B, T, H, dtype=torch.float32, device=q.device)
    dummy = dq  # stands in for absent pointers (never read: constexpr branches)
    _dqkwg[(NK * n_chunks, B * H)](
        q, k, v, g, h, do, dh, dummy if dv is None else dv.contiguous(), dq, dk, dummy if dw is None else dw,
        dg, cu_seqlens if cu_seqlens is not None else dummy, chunk_indices if chunk_indices is not None else dummy,
        scale, T, B * T * H, H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV, NK=NK,
        VARLEN=cu_seqlens is not None, HAS_DW=dv is not None, num_warps=config["num_warps"],
        num_stages=config["num_stages"] if q.element_size() == 2 else 1)  # float32 tiles: 3 stages overflow smem
    return dq, dk, dw, dg.sum(0)


def _on_device(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device), as FLA's own input_guard does."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _chunk_indices(cu_seqlens):
    from fla.ops.utils import prepare_chunk_indices

    return None if cu_seqlens is None else prepare_chunk_indices(cu_seqlens, CHUNK)


class SimpleGLA(torch.autograd.Function):
    """Mamba-2 / SSD (scalar decay per token and head): FLA's chunk forward and backward with
    :func:`dqkwg` in place of FLA's gated ``chunk_bwd_dqkwg``."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        with _on_device(q):
            return SimpleGLA._forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)

    @staticmethod
    def backward(ctx, do, dht):
        with _on_device(do):
            return SimpleGLA._backward(ctx, do, dht)

    @staticmethod
    def _forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        from fla.ops.simple_gla.chunk import chunk_simple_gla_fwd
        from fla.ops.utils import chunk_local_cumsum
        from fla.ops.utils.constant import RCP_LN2

        q, k, v = (x.contiguous() for x in (q, k, v))
        idx = _chunk_indices(cu_seqlens)
        gc = chunk_local_cumsum(g.float().contiguous(), chunk_size=CHUNK, scale=RCP_LN2, cu_seqlens=cu_seqlens,
                                chunk_indices=idx)
        o, final = chunk_simple_gla_fwd(q=q, k=k, v=v, g=gc, scale=scale, initial_state=initial_state,
                                        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                        chunk_size=CHUNK, chunk_indices=idx)
        ctx.save_for_backward(q, k, v, gc, initial_state, cu_seqlens, idx)
        ctx.scale, ctx.g_dtype = scale, g.dtype
        return o.to(q.dtype), final

    @staticmethod
    def _backward(ctx, do, dht):
        from fla.ops.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
        from fla.ops.common.chunk_o import chunk_bwd_dv
        from fla.ops.utils import chunk_local_cumsum

        q, k, v, gc, h0, cu_seqlens, idx = ctx.saved_tensors
        # FLA reads dht as contiguous; the gradient of e.g. final.sum() arrives expanded (stride 0)
        scale, do, dht = ctx.scale, do.contiguous(), None if dht is None else dht.contiguous()
        h, _ = chunk_fwd_h(k=k, v=v, g=gc, h0=h0, output_final_state=False, cu_seqlens=cu_seqlens,
                           chunk_size=CHUNK, states_in_fp32=True)
        dh, dh0 = chunk_bwd_dh(q=q, k=k, v=v, g=gc, do=do, h0=h0, dht=dht, scale=scale, cu_seqlens=cu_seqlens,
                               chunk_size=CHUNK, states_in_fp32=True)
        dq, dk, _, dg = dqkwg(q, k, v, gc, h, do, dh, scale, cu_seqlens, idx)
        dv = chunk_bwd_dv(q=q, k=k, g=gc, do=do, dh=dh, scale=scale, cu_seqlens=cu_seqlens, chunk_size=CHUNK,
                          chunk_indices=idx)
        dg = chunk_local_cumsum(dg, chunk_size=CHUNK, reverse=True, cu_seqlens=cu_seqlens, chunk_indices=idx)
        return dq, dk, dv.to(v.dtype), dg.to(ctx.g_dtype), None, dh0, None, None


class GatedDeltaRule(torch.autograd.Function):
    """Gated DeltaNet: FLA's chunk forward and backward with :func:`dqkwg` (with dw) in place of
    FLA's gated ``chunk_bwd_dqkwg``."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        with _on_device(q):
            return GatedDeltaRule._forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state,
                                           cu_seqlens)

    @staticmethod
    def backward(ctx, do, dht):
        with _on_device(do):
            return GatedDeltaRule._backward(ctx, do, dht)

    @staticmethod
    def _forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_fwd

        q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
        idx = _chunk_indices(cu_seqlens)
        gc, o, A, final, _, _ = chunk_gated_delta_rule_fwd(
            q=q, k=k, v=v, g=g.float().contiguous(), beta=beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_indices=idx, chunk_size=CHUNK)
        ctx.save_for_backward(q, k, v, gc, beta, A, initial_state, cu_seqlens, idx)
        ctx.scale, ctx.g_dtype = scale, g.dtype
        return o.to(q.dtype), final

    @staticmethod
    def _backward(ctx, do, dht):
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
        from fla.ops.common.chunk_o import chunk_bwd_dv_local
        from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd, recompute_w_u_fwd
        from fla.ops.utils import chunk_local_cumsum

        q, k, v, gc, beta, A, h0, cu_seqlens, idx = ctx.saved_tensors
        # FLA reads dht as contiguous; the gradient of e.g. final.sum() arrives expanded (stride 0)
        scale, do, dht = ctx.scale, do.contiguous(), None if dht is None else dht.contiguous()
        common = dict(cu_seqlens=cu_seqlens, chunk_indices=idx)
        w, u = recompute_w_u_fwd(k=k, v=v, beta=beta, A=A, g=gc, **common)
        h, v_new, _ = chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, g=gc, initial_state=h0, output_final_state=False,
                                                   chunk_size=CHUNK, **common)
        dv = chunk_bwd_dv_local(q=q, k=k, g=gc, do=do, scale=scale, chunk_size=CHUNK, **common)
        dh, dh0, dv = chunk_gated_delta_rule_bwd_dhu(q=q, k=k, w=w, g=gc, h0=h0, dht=dht, do=do, dv=dv, scale=scale,
                                                     chunk_size=CHUNK, **common)
        dq, dk, dw, dg = dqkwg(q, k, v_new, gc, h, do, dh, scale, cu_seqlens, idx, dv=dv)
        dk2, dv, db, dg2 = prepare_wy_repr_bwd(k=k, v=v, beta=beta, g=gc, A=A, dw=dw, du=dv, **common)
        dk = dk + dk2
        dg = chunk_local_cumsum(dg + dg2, chunk_size=CHUNK, reverse=True, **common)
        return dq, dk, dv.to(v.dtype), dg.to(ctx.g_dtype), db.to(beta.dtype), None, dh0, None, None


@torch.compiler.disable  # as FLA's own entry points: Triton launches stay out of graphs
def simple_gla(q, k, v, g, scale: float, initial_state, output_final_state: bool, cu_seqlens):
    """SSD / Mamba-2 chunk op (arguments as :func:`hippolm.ops.ssd`); returns (o, final state or None)."""
    s0 = None if initial_state is None else initial_state.float().contiguous()
    return SimpleGLA.apply(q, k, v, g, scale, s0, output_final_state, cu_seqlens)


@torch.compiler.disable
def gated_delta_rule(q, k, v, g, beta, scale: float, initial_state, output_final_state: bool, cu_seqlens):
    """Gated DeltaNet chunk op (arguments as :func:`hippolm.ops.gated_delta_rule`)."""
    s0 = None if initial_state is None else initial_state.float().contiguous()
    return GatedDeltaRule.apply(q, k, v, g, beta, scale, s0, output_final_state, cu_seqlens)
