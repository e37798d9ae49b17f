"""Decode-time ops: one new token per sequence.

- :func:`decode_attention`: one query per head over a whole key/value buffer (every slot visible),
  as an AHN cache past its window or a full-attention cache of exactly the context. On CUDA a
  split-KV ("flash-decoding") Triton kernel reads each key/value head once for all the query heads
  of its GQA group and spreads long buffers over all SMs; elsewhere SDPA.
- :func:`memory_step`: the whole memory update and read of one layer for one token (normalise q, k;
  decay; delta-rule or plain write; read; RMSNorm and output gate) in one kernel per layer on CUDA,
  updating the fp32 state in place; elsewhere the reference ops.

Both are replayable from a CUDA graph (no host syncs, fixed buffers).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from . import reference
from .loglinear import LogLinearState, step_unchecked

try:  # triton is optional: CPU installs and CI do without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


# Under TRITON_INTERPRET=1 the kernels also run on CPU tensors (slowly): how they are tested without a GPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_ok(*tensors: torch.Tensor) -> bool:
    return triton is not None and (_INTERPRET or all(t.is_cuda for t in tensors))


def _runtime_loops_ready() -> None:
    """Under Triton's interpreter, the fix that kernels looping over runtime bounds need."""
    if _INTERPRET:
        from .triton_backend import _patch_interpreter

        _patch_interpreter()


# --- attention over a cache ---------------------------------------------------------------------
def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                               mask: torch.Tensor | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] -> [B, H, Dv]; mask [B, S] (True: visible) or None;
    ``add`` [B, H, Dv] is added to the output."""
    m = None if mask is None else mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=m, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])[:, :, 0]
    return o if add is None else (o.float() + add.float()).to(o.dtype)


if triton is not None:

    @triton.jit
    def _attn_block(q, k_base, v_base, offs, valid, sks, svs, m_i, l_i, acc, d, dv, PRECISION: tl.constexpr):
        """Online-softmax update of one split's (max, sum, accumulator) with one block of keys."""
        k = tl.load(k_base + offs[:, None] * sks + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no visible key
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs[:, None] * svs + dv[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _attn_split_kernel(Q, K, V, MASK, SLOT_POS, CURSOR, QPOS, ACC, M, L, S, n_kv_heads, scale, sinks, window,
                           sqb, sqh, skb, skh, sks, svb, svh, svs, smb,
                           G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                           BLOCK: tl.constexpr, SPLIT_LEN: tl.constexpr, PRECISION: tl.constexpr,
                           HAS_MASK: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_QPOS: tl.constexpr):
        pid_bh, sp = tl.program_id(0), tl.program_id(1)
        n_split = tl.num_programs(1)
        b, hk = pid_bh // n_kv_heads, pid_bh % n_kv_heads
        g, d, dv = tl.arange(0, GP), tl.arange(0, D), tl.arange(0, DV)
        q = tl.load(Q + b * sqb + (hk * G + g)[:, None] * sqh + d[None, :], mask=(g < G)[:, None], other=0.0)
        q = (q.to(tl.float32) * scale).to(q.dtype)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DV], tl.float32)
        k_base, v_base = K + b * skb + hk * skh, V + b * svb + hk * svh
        if HAS_SLOTS:
            # An AHN cache: only its filled slots are read (sinks, then the ring up to the cursor),
            # spread evenly over the splits; visibility from the slot positions (cache_attention).
            filled = sinks + tl.minimum(tl.load(CURSOR + b), window).to(tl.int32)
            split = tl.cdiv(tl.cdiv(filled, BLOCK), n_split) * BLOCK
            start = sp * split
            end = tl.minimum(start + split, filled)
            see_all = sinks < 0  # (False)
            if HAS_QPOS:
                see_all = tl.load(QPOS + b) < 0  # a padding query: its output is ignored
            for i in range(start, end, BLOCK):
                offs = i + tl.arange(0, BLOCK)
                valid = offs < end
                slot_pos = tl.load(SLOT_POS + b * smb + offs, mask=valid, other=-1)
                valid = valid & ((slot_pos >= tl.where(offs < sinks, 0, sinks)) | see_all)
                m_i, l_i, acc = _attn_block(q, k_base, v_base, offs, valid, sks, svs, m_i, l_i, acc, d, dv,
                                            PRECISION)
        else:
            start = sp * SPLIT_LEN
            for i in range(0, SPLIT_LEN, BLOCK):  # SPLIT_LEN: a multiple of BLOCK
                offs = start + i + tl.arange(0, BLOCK)
                valid = offs < S
                if HAS_MASK:
                    valid = valid & (tl.load(MASK + b * smb + offs, mask=offs < S, other=0) != 0)
                m_i, l_i, acc = _attn_block(q, k_base, v_base, offs, valid, sks, svs, m_i, l_i, acc, d, dv,
                                            PRECISION)
        row = pid_bh * n_split + sp
        tl.store(ACC + row * GP * DV + g[:, None] * DV + dv[None, :], acc)
        tl.store(M + row * GP + g, m_i)
        tl.store(L + row * GP + g, l_i)

    @triton.jit
    def _attn_combine_kernel(ACC, M, L, ADD, OUT, n_split, G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr,
                             NSP: tl.constexpr, HAS_ADD: tl.constexpr):
        """Merge the splits of one (sequence, query head): softmax-weighted by each split's max."""
        pid = tl.program_id(0)  # (b * Hkv + hk) * G + g = b * H + h
        bh, g = pid // G, pid % G
        sp, dv = tl.arange(0, NSP), tl.arange(0, DV)
        ok = sp < n_split
        rows = (bh * n_split + sp) * GP + g
        m = tl.load(M + rows, mask=ok, other=float("-inf"))
        w = tl.exp(m - tl.max(m, 0))
        w = tl.where(m == float("-inf"), 0.0, w)  # splits that saw no visible key
        denom = tl.sum(w * tl.load(L + rows, mask=ok, other=0.0), 0)
        acc = tl.load(ACC + rows[:, None] * DV + dv[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / denom
        if HAS_ADD:
            out += tl.load(ADD + pid * DV + dv).to(tl.float32)
        tl.store(OUT + pid * DV + dv, out.to(OUT.dtype.element_ty))


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


# Splits of the key buffer per (sequence, KV head) in the decode attention; 0: the rule below (at
# most two programs per SM); benchmarks/decode_step_timing.py --splits times others.
ATTENTION_SPLITS = 0


def _decode_attention_triton(q, k, v, scale, mask=None, add=None, slots=None):
    """``slots``: (slot_pos, cursor, query_pos or None, sinks, window) of an AHN cache (cache_attention)."""
    B, H, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    GP, BLOCK = max(16, triton.next_power_of_2(G)), 64
    blocks = triton.cdiv(S, BLOCK)
    # At most two programs per SM (two fit by shared memory), rounded down: on an H100 with 8 x 2 KV
    # heads 16 splits, 349 us at 128k; rounded up (17) 383, as slow as 32 or 33 (the split sweep of
    # decode_step_timing.py). Each split holds at least one block of keys.
    want = ATTENTION_SPLITS or max(1, 2 * _num_sms(q.device) // (B * Hkv))
    split_len = triton.cdiv(blocks, min(blocks, want)) * BLOCK
    n_split = triton.cdiv(S, split_len)
    acc = torch.empty(B * Hkv, n_split, GP, Dv, device=q.device, dtype=torch.float32)
    m = torch.empty(B * Hkv, n_split, GP, device=q.device, dtype=torch.float32)
    l_ = torch.empty_like(m)
    slot_pos, cursor, query_pos, sinks, window = slots if slots is not None else (None, None, None, 0, 0)
    if slots is not None:
        _runtime_loops_ready()
    if mask is not None:
        mask = mask.to(torch.uint8)
    rows = mask if mask is not None else slot_pos
    _attn_split_kernel[(B * Hkv, n_split)](
        q, k, v, q if mask is None else mask, q if slot_pos is None else slot_pos, q if cursor is None else cursor,
        q if query_pos is None else query_pos, acc, m, l_, S, Hkv, scale, sinks, window,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        0 if rows is None else rows.stride(0),
        G=G, GP=GP, D=D, DV=Dv, BLOCK=BLOCK, SPLIT_LEN=split_len,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_MASK=mask is not None,
        HAS_SLOTS=slots is not None, HAS_QPOS=query_pos is not None, num_warps=4, num_stages=3)
    out = torch.empty(B, H, Dv, device=q.device, dtype=q.dtype)
    _attn_combine_kernel[(B * H,)](acc, m, l_, out if add is None else add.contiguous(), out, n_split, G=G, GP=GP,
                                   DV=Dv, NSP=triton.next_power_of_2(n_split), HAS_ADD=add is not None, num_warps=4)
    return out


def _attention_kernel_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    D = q.shape[-1]
    return (_triton_ok(q, k, v) and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.dtype == q.dtype
            and D in (32, 64, 128, 256) and v.shape[-1] in (32, 64, 128, 256) and q.shape[1] % k.shape[1] == 0
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     mask: torch.Tensor | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per head over a buffer: q [B, H, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]
    (H a multiple of Hkv; slot order irrelevant) -> [B, H, Dv]. ``mask`` [B, S] bool marks the visible
    slots (None: all); every sequence must see at least one. ``add`` [B, H, Dv] (e.g. the memory's
    read-out) is added to the result in the same kernel."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _attention_kernel_ok(q, k, v):
        return _decode_attention_triton(q, k, v, scale, mask, add)
    return decode_attention_reference(q, k, v, scale, mask, add)


def cache_visible(slot_pos: torch.Tensor, cursor: torch.Tensor, query_pos: torch.Tensor | None, sinks: int,
                  window: int) -> torch.Tensor:
    """[B, sinks + window] bool: the slots of an AHN cache a new query sees (see :func:`cache_attention`)."""
    slot = torch.arange(slot_pos.shape[1], device=slot_pos.device)
    filled = slot[None] < sinks + cursor.clamp(max=window)[:, None]
    real = slot_pos >= torch.where(slot < sinks, 0, sinks)[None]
    if query_pos is not None:
        real = real | (query_pos < 0)[:, None]
    return filled & real


def cache_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot_pos: torch.Tensor,
                    cursor: torch.Tensor, sinks: int, window: int, scale: float | None = None,
                    query_pos: torch.Tensor | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`decode_attention` of one new query per sequence over an AHN cache (the new token already
    written): keys/values [B, Hkv, sinks + window, d], ``slot_pos`` [B, sinks + window] (each slot's real
    position, -1: empty or padding), ``cursor`` [B] the stream length. Visible: the filled slots (the
    sinks, then ring slots up to the cursor) holding a real token, ring copies of sink tokens excepted
    (their sink slot serves); a padding query (``query_pos`` < 0) sees every filled slot (its output is
    ignored). Every ring token is within the window of the query, so no position test is needed. On
    CUDA the kernel reads only the filled slots, so a step while the window fills costs what its
    context does."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _attention_kernel_ok(q, keys, values) and slot_pos.stride(-1) == 1 and slot_pos.dtype == torch.int32:
        return _decode_attention_triton(q, keys, values, scale, add=add,
                                        slots=(slot_pos, cursor, query_pos, sinks, window))
    return decode_attention_reference(q, keys, values, scale, cache_visible(slot_pos, cursor, query_pos, sinks, window),
                                      add)


# --- the memory step ----------------------------------------------------------------------------
def memory_step_reference(q, k, v, g, beta, delta: bool, state, norm_weight, gate, eps: float, scale: float):
    """Reference of :func:`memory_step` (returns the new state instead of writing it in place)."""
    q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    if not delta:  # plain write of strength beta (Mamba-2's dt): S <- a S + beta k v^T
        k, beta = k * beta.float()[..., None], None
    o, new = reference.step(q, k, v, g, beta, state, scale)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    return o * F.silu(gate.float())[..., None], new


if triton is not None:

    @triton.jit
    def _state_step(S, k, v, decay, beta, DECAY: tl.constexpr, BETA: tl.constexpr, DELTA: tl.constexpr):
        """One token into the float32 state S [KD, BV] (its value columns): S' = a S + k u^T with u = v,
        beta v, or with DELTA the delta rule's beta (v - (a S)^T k). The read S'^T q is the caller's,
        after S' is stored (read first, the memory kernels spill more)."""
        if DECAY:
            S = S * decay
        if DELTA:
            v = v - tl.sum(S * k[:, None], 0)
        if BETA:
            v = beta * v
        return S + k[:, None] * v[None, :]


# --- the AHN cache at decode: the evicted token is read from, and the new one written to, its slot ---
def evicted_slot(cursor: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Ring slot [B] of the token leaving the window (and taken by the new one) at stream index ``cursor``."""
    return sinks + cursor % window


def evicted_entry(keys: torch.Tensor, values: torch.Tensor, ring_gates: torch.Tensor, cursor: torch.Tensor,
                  sinks: int, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What leaves the window at stream index ``cursor`` [B]: its key and value [B, Hkv, d], its write
    gates [B, ...] (float32) and its ring slot [B]; a fixed sequence of gathers (no host sync)."""
    slot = evicted_slot(cursor, sinks, window)
    rows = torch.arange(keys.shape[0], device=keys.device)
    return keys[rows, :, slot], values[rows, :, slot], ring_gates[rows, slot - sinks].float(), slot


def memory_step_from_cache_reference(q, keys, values, ring_gates, cursor, sinks, window, g_idx, beta_idx, delta,
                                     state, norm_weight, gate, eps, scale, o_proj=None):
    k, v, wg, _ = evicted_entry(keys, values, ring_gates, cursor, sinks, window)  # [B, Hkv, d], [B, H, G]
    g = wg[..., g_idx] if g_idx >= 0 else None
    out, new = memory_step_reference(q, k, v, g, wg[..., beta_idx], delta, state, norm_weight, gate, eps, scale)
    state.copy_(new)
    return out if o_proj is None else torch.einsum("bhd,hde->bhe", out, o_proj.to(out.dtype))


if triton is not None:

    @triton.jit
    def _evicted_token(Q, KEYS, VALUES, RING_G, CURSOR, SLOT_POS, pid, H, n_kv_heads, sinks, window, sqb, sqh, skb,
                       skh, sks, svb, svh, svs, sgb, sgw, sgh, spb, v0, KD: tl.constexpr, BV: tl.constexpr,
                       CHECK_SLOT: tl.constexpr):
        """Loads of program pid = b * H + h of a cached decode step: (b, h, key and value column
        offsets, its query and the key and value columns v0 .. v0 + BV of the token leaving the window
        (float32, its GQA group's), its write gates' address, and with CHECK_SLOT whether that slot
        holds a real token past the sinks, else True). Loads only, in this order (the callers issue
        every load before the arithmetic; the compiled steps are the GPU-timed ones)."""
        b, h = pid // H, pid % H
        hk = h // (H // n_kv_heads)
        slot = sinks + tl.load(CURSOR + b) % window
        ok = True
        if CHECK_SLOT:
            ok = tl.load(SLOT_POS + b * spb + slot) >= sinks
        kk, vv = tl.arange(0, KD), v0 + tl.arange(0, BV)
        q = tl.load(Q + b * sqb + h * sqh + kk).to(tl.float32)
        k = tl.load(KEYS + b * skb + hk * skh + slot * sks + kk).to(tl.float32)
        v = tl.load(VALUES + b * svb + hk * svh + slot * svs + vv).to(tl.float32)
        return b, h, kk, vv, q, k, v, RING_G + b * sgb + (slot - sinks) * sgw + h * sgh, ok

    @triton.jit
    def _l2_normalized(x):
        """F.normalize of a vector."""
        return x / tl.maximum(tl.sqrt(tl.sum(x * x, 0)), 1e-12)

    @triton.jit
    def _memory_step_cache_kernel(Q, KEYS, VALUES, RING_G, CURSOR, STATE, NW, GATE, OPROJ, OUT, H, n_kv_heads,
                                  sinks, window, eps, scale, sqb, sqh, skb, skh, sks, svb, svh, svs, sgb, sgw, sgh,
                                  KD: tl.constexpr, VD: tl.constexpr, G_IDX: tl.constexpr, BETA_IDX: tl.constexpr,
                                  DELTA: tl.constexpr, HAS_PROJ: tl.constexpr):
        pid = tl.program_id(0)  # b * H + h
        _, h, kk, vv, q, k, v, gates, _ = _evicted_token(Q, KEYS, VALUES, RING_G, CURSOR, CURSOR, pid, H, n_kv_heads,
                                                         sinks, window, sqb, sqh, skb, skh, sks, svb, svh, svs, sgb,
                                                         sgw, sgh, 0, 0, KD, VD, False)
        s_ptr = STATE + pid * KD * VD + kk[:, None] * VD + vv[None, :]
        S = tl.load(s_ptr)
        # every load issued before the arithmetic: a step is one latency-bound pass over ~100 KB
        beta = tl.load(gates + BETA_IDX).to(tl.float32)
        decay = 1.0
        if G_IDX >= 0:
            decay = tl.exp(tl.load(gates + G_IDX).to(tl.float32))
        nw = tl.load(NW + vv).to(tl.float32)
        gate = tl.load(GATE + pid).to(tl.float32)
        if HAS_PROJ:  # the head's block of the read-out projection
            w = tl.load(OPROJ + h * VD * VD + vv[:, None] * VD + vv[None, :])
        q, k = _l2_normalized(q), _l2_normalized(k)
        S = _state_step(S, k, v, decay, beta, G_IDX >= 0, True, DELTA)
        tl.store(s_ptr, S)
        o = tl.sum(S * q[:, None], 0) * scale
        o = o / tl.sqrt(tl.sum(o * o, 0) / VD + eps) * nw
        o = o * gate / (1 + tl.exp(-gate))
        if HAS_PROJ:  # o @ OPROJ[h]
            o = tl.sum(o[:, None] * w.to(tl.float32), 0)
        tl.store(OUT + pid * VD + vv, o)

    @triton.jit
    def _cache_write_kernel(KEYS, VALUES, RING_G, SLOT_POS, K, V, GATES, REAL_SEEN, CURSOR, POS, n_kv_heads, HG,
                            sinks, window, skb, skh, sks, svb, svh, svs, sgb, sgw, spb, s_kb, s_kh, s_vb, s_vh, s_gb,
                            HKV_P: tl.constexpr, KD: tl.constexpr, VD: tl.constexpr, HG_P: tl.constexpr,
                            HAS_POS: tl.constexpr):
        b = tl.program_id(0)
        cur = tl.load(CURSOR + b)
        slot = sinks + cur % window
        seen = tl.load(REAL_SEEN + b)
        pos = seen
        if HAS_POS:
            pos = tl.load(POS + b).to(seen.dtype)
        hk = tl.arange(0, HKV_P)
        hm = (hk < n_kv_heads)[:, None]
        kk, vv = tl.arange(0, KD), tl.arange(0, VD)
        k = tl.load(K + b * s_kb + hk[:, None] * s_kh + kk[None, :], mask=hm)
        tl.store(KEYS + b * skb + hk[:, None] * skh + slot * sks + kk[None, :], k, mask=hm)
        v = tl.load(V + b * s_vb + hk[:, None] * s_vh + vv[None, :], mask=hm)
        tl.store(VALUES + b * svb + hk[:, None] * svh + slot * svs + vv[None, :], v, mask=hm)
        j = tl.arange(0, HG_P)
        g = tl.load(GATES + b * s_gb + j, mask=j < HG)
        g = tl.where(pos >= sinks, g, 0.0)  # padding and sinks never enter the memory
        tl.store(RING_G + b * sgb + (slot - sinks) * sgw + j, g.to(RING_G.dtype.element_ty), mask=j < HG)
        tl.store(SLOT_POS + b * spb + slot, pos.to(SLOT_POS.dtype.element_ty))
        is_sink = (pos >= 0) & (pos < sinks)  # also kept for good in its sink slot
        sink = tl.minimum(tl.maximum(pos, 0), tl.maximum(sinks - 1, 0))
        tl.store(KEYS + b * skb + hk[:, None] * skh + sink * sks + kk[None, :], k, mask=hm & is_sink)
        tl.store(VALUES + b * svb + hk[:, None] * svh + sink * svs + vv[None, :], v, mask=hm & is_sink)
        tl.store(SLOT_POS + b * spb + sink, pos.to(SLOT_POS.dtype.element_ty), mask=is_sink)
        tl.store(REAL_SEEN + b, seen + (pos >= 0).to(seen.dtype))
        tl.store(CURSOR + b, cur + 1)


# Warps per (sequence, head) program of the cached memory step (benchmarks/decode_step_timing.py).
MEMORY_STEP_WARPS = 8


def memory_step_from_cache(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ring_gates: torch.Tensor,
                           cursor: torch.Tensor, sinks: int, window: int, g_idx: int, beta_idx: int, delta: bool,
                           state: torch.Tensor, norm_weight: torch.Tensor, gate: torch.Tensor, eps: float = 1e-6,
                           scale: float | None = None, o_proj: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`memory_step` for the token leaving an AHN cache's window at stream index ``cursor`` [B]:
    its key/value [B, Hkv, sinks + window, d] and write gates ``ring_gates`` [B, window, H, G] (log decay
    at ``g_idx``, -1: none; write strength at ``beta_idx``) are read from its ring slot directly.
    ``o_proj`` [H, V, V]: a per-head read-out projection applied to the result (float32)."""
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    if (_triton_ok(q, keys, state) and state.dtype == torch.float32 and state.is_contiguous()
            and K in (32, 64, 128) and values.shape[-1] in (32, 64, 128) and q.shape[1] % keys.shape[1] == 0
            and q.stride(-1) == keys.stride(-1) == values.stride(-1) == 1 and ring_gates.stride(-1) == 1
            and ring_gates.stride(-2) == ring_gates.shape[-1] and (o_proj is None or o_proj.is_contiguous())):
        B, H, _ = q.shape
        V = values.shape[-1]
        out = torch.empty(B, H, V, device=q.device, dtype=torch.float32)
        _memory_step_cache_kernel[(B * H,)](
            q, keys, values, ring_gates, cursor, state, norm_weight, gate.contiguous(),
            state if o_proj is None else o_proj, out, H, keys.shape[1], sinks, window, eps, scale, q.stride(0),
            q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1),
            values.stride(2), ring_gates.stride(0), ring_gates.stride(1), ring_gates.stride(2), KD=K, VD=V,
            G_IDX=g_idx, BETA_IDX=beta_idx, DELTA=delta, HAS_PROJ=o_proj is not None, num_warps=MEMORY_STEP_WARPS)
        return out
    return memory_step_from_cache_reference(q, keys, values, ring_gates, cursor, sinks, window, g_idx, beta_idx,
                                            delta, state, norm_weight, gate, eps, scale, o_proj)


def cache_write_reference(keys, values, ring_gates, slot_pos, k, v, gates, real_seen, cursor, sinks, window,
                          pos=None):
    B = keys.shape[0]
    slot = evicted_slot(cursor, sinks, window)
    b = torch.arange(B, device=keys.device)
    pos = real_seen.clone() if pos is None else pos.to(real_seen.dtype)
    keys[b, :, slot] = k
    values[b, :, slot] = v
    enters = (pos >= sinks).view(B, *[1] * (gates.ndim - 1))
    ring_gates[b, slot - sinks] = torch.where(enters, gates, 0).to(ring_gates.dtype)
    slot_pos[b, slot] = pos.to(slot_pos.dtype)
    if sinks:
        hit, sink = (pos >= 0) & (pos < sinks), pos.clamp(0, sinks - 1)
        keys[b, :, sink] = torch.where(hit[:, None, None], k, keys[b, :, sink])
        values[b, :, sink] = torch.where(hit[:, None, None], v, values[b, :, sink])
        slot_pos[b, sink] = torch.where(hit, pos.to(slot_pos.dtype), slot_pos[b, sink])
    real_seen += (pos >= 0).to(real_seen.dtype)
    cursor += 1


def cache_write(keys: torch.Tensor, values: torch.Tensor, ring_gates: torch.Tensor, slot_pos: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, real_seen: torch.Tensor,
                cursor: torch.Tensor, sinks: int, window: int, pos: torch.Tensor | None = None) -> None:
    """Write one new token per sequence into its ring slot and advance ``real_seen`` and ``cursor``
    [B], all in place: k, v [B, Hkv, d]; gates [B, H, G]. ``pos`` [B]: the token's real position (-1:
    padding; None: ``real_seen``, a real token). Padding and sink tokens are stored with zero write
    gates (a memory step on them is a no-op); a sink token is also kept in its sink slot. One kernel
    on CUDA."""
    if (_triton_ok(keys, k) and k.stride(-1) == v.stride(-1) == keys.stride(-1) == values.stride(-1) == 1
            and gates.is_contiguous() and ring_gates.is_contiguous() and slot_pos.stride(-1) == 1
            and keys.shape[-1] in (32, 64, 128, 256) and values.shape[-1] in (32, 64, 128, 256)):
        B, Hkv = keys.shape[:2]
        hg = gates[0].numel()
        _cache_write_kernel[(B,)](
            keys, values, ring_gates, slot_pos, k, v, gates, real_seen, cursor, cursor if pos is None else pos, Hkv,
            hg, sinks, window, keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1),
            values.stride(2), ring_gates.stride(0), ring_gates.stride(1), slot_pos.stride(0), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), gates.stride(0), HKV_P=triton.next_power_of_2(Hkv),
            KD=keys.shape[-1], VD=values.shape[-1], HG_P=triton.next_power_of_2(hg), HAS_POS=pos is not None,
            num_warps=4)
        return
    cache_write_reference(keys, values, ring_gates, slot_pos, k, v, gates, real_seen, cursor, sinks, window, pos)


def memory_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                beta: torch.Tensor | None, delta: bool, state: torch.Tensor, norm_weight: torch.Tensor,
                gate: torch.Tensor, eps: float = 1e-6, scale: float | None = None) -> torch.Tensor:
    """One memory write + read per sequence, updating ``state`` in place; returns [B, H, V] float32.

    q [B, H, K] (the query), k [B, Hkv, K] and v [B, Hkv, V] (the token written, shared by the
    query heads of its GQA group), g [B, H] log decay or None, beta [B, H] write strength or None,
    ``delta``: delta rule (S <- a (I - beta k k^T) S + beta k v^T) or plain write (S <- a S + beta k v^T);
    state [B, H, K, V] float32; q and k are L2-normalised; the read ``S^T q * scale`` goes through
    RMSNorm (``norm_weight``, ``eps``) and the output gate ``silu(gate)`` [B, H].
    """
    # The token as a one-slot cache (sinks 0, window 1, cursor 0) through the cached step's kernel.
    ones = torch.ones_like(gate, dtype=torch.float32)
    gates = torch.stack([ones if g is None else g.float(), ones if beta is None else beta.float()], -1)[:, None]
    cursor = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return memory_step_from_cache(q, k[:, :, None], v[:, :, None], gates, cursor, 0, 1, -1 if g is None else 0, 1,
                                  delta and beta is not None, state, norm_weight, gate, eps, scale)


# The decode step kernels: the head dims they take, and value columns / warps per program ([K, BV]
# tiles, so a batch of 8 x 16 heads runs 4 programs per (sequence, head) and more than one per SM
# keeps loads in flight).
_STEP_DIMS = (16, 32, 64, 128)
STEP_BV = 32
STEP_WARPS = 4


def _step_fits(q: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None) -> bool:
    """Whether a step kernel takes these inputs: 16/32-bit q, v of those head dims, a float32 state
    (or None) on the same device."""
    return (_triton_ok(q, v, *([] if state is None else [state])) and q.dtype != torch.float64
            and q.shape[-1] in _STEP_DIMS and v.shape[-1] in _STEP_DIMS
            and (state is None or state.dtype == torch.float32))


# --- the linear recurrences' decode step (ops.ssd_step, delta_rule_step, gated_delta_rule_step) -------
if triton is not None:

    @triton.jit
    def _recurrent_step_kernel(Q, K, V, G_, BETA, S_IN, S_OUT, OUT, scale, KD: tl.constexpr, VD: tl.constexpr,
                               BV: tl.constexpr, HAS_STATE: tl.constexpr, HAS_G: tl.constexpr,
                               HAS_BETA: tl.constexpr):
        """One (sequence, head, block of BV value columns): S' = a S + k u^T with u = v, or the delta
        rule's u = beta (v - S^T k) (a = exp(g)); o = S'^T q * scale. The new state goes to S_OUT."""
        pid = tl.program_id(0)  # b * H + h
        kk, vv = tl.arange(0, KD), tl.program_id(1) * BV + tl.arange(0, BV)
        q = tl.load(Q + pid * KD + kk).to(tl.float32)
        k = tl.load(K + pid * KD + kk).to(tl.float32)
        v = tl.load(V + pid * VD + vv).to(tl.float32)
        tile = pid.to(tl.int64) * KD * VD + kk[:, None] * VD + vv[None, :]
        S = tl.zeros((KD, BV), dtype=tl.float32)
        if HAS_STATE:
            S = tl.load(S_IN + tile).to(tl.float32)
        decay, beta = 1.0, 1.0
        if HAS_G:
            decay = tl.exp(tl.load(G_ + pid).to(tl.float32))
        if HAS_BETA:
            beta = tl.load(BETA + pid).to(tl.float32)
        S = _state_step(S, k, v, decay, beta, HAS_G, HAS_BETA, HAS_BETA)
        tl.store(S_OUT + tile, S)
        tl.store(OUT + pid * VD + vv, tl.sum(S * q[:, None], 0) * scale)


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                   beta: torch.Tensor | None, state: torch.Tensor | None,
                   scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hippolm.ops.reference.step` (one token of SSD / the delta rule / GDN) into a new float32
    state, one kernel on CUDA. Returns (o [B, H, V] in q's dtype, new state [B, H, K, V])."""
    B, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    if _step_fits(q, v, state) and _triton_ok(k):
        new = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
        out = torch.empty(B, H, V, device=q.device, dtype=torch.float32)
        c = lambda x: x.contiguous()  # noqa: E731
        bv = min(V, STEP_BV)
        _recurrent_step_kernel[(B * H, V // bv)](
            c(q), c(k), c(v), new if g is None else c(g.float()), new if beta is None else c(beta.float()),
            new if state is None else c(state), new, out, scale, KD=K, VD=V, BV=bv, HAS_STATE=state is not None,
            HAS_G=g is not None, HAS_BETA=beta is not None, num_warps=STEP_WARPS)
        return out.to(q.dtype), new
    return reference.step(q, k, v, g, beta, state, scale)


# --- the log-linear memory step -------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _loglinear_levels(q, k, v, decay, beta, ok, pos, LAM, SLOTS, DST, pid, vv, L, scale, KD: tl.constexpr,
                          VD: tl.constexpr, BV: tl.constexpr, HAS_BETA: tl.constexpr, ALL_LEVELS: tl.constexpr):
        """The step of program ``pid`` = n * H + h on its BV value columns ``vv`` (the columns are
        independent): Fenwick carry, decay, delta rule, the new token into level 0 and the
        level-weighted read, one pass over the level slots; returns the read [BV] (0 where not ``ok``).
        Only occupied slots are loaded and only changed ones stored: at position p, level 0 holds
        token p-1 and level l >= 1 is non-empty iff bit l-1 of p-1 is set (the Fenwick partition;
        every op leaves the other slots zero), so a step moves about half of the log2(p) + 1 live
        levels, not all L, and the loop stops above them. Where not ``ok`` nothing is stored.
        DST: where the new slots go, SLOTS itself (in place) or, with ALL_LEVELS, a new state whose
        every slot is written (zeros where empty)."""
        kk = tl.arange(0, KD)
        prev = tl.maximum(pos - 1, 0)
        # Going from position pos-1 to pos, slots 0..target-1 merge into slot target = bit_length(pos ^ (pos-1)).
        # pos ^ (pos-1) = 2^target - 1, so target = log2 of it plus one: exact in float32, rounded.
        target = (tl.log2(((pos ^ prev) + 1).to(tl.float32)) + 0.5).to(tl.int32)
        carry = pos > 0
        tile = kk[:, None] * VD + vv[None, :]
        base = SLOTS + pid.to(tl.int64) * L * KD * VD
        dst = DST + pid.to(tl.int64) * L * KD * VD
        merged = tl.zeros((KD, BV), dtype=tl.float32)
        o = tl.zeros((BV,), dtype=tl.float32)
        # levels above bit_length(pos) are empty before and after the step; the float log2 may round
        # either way, so take one level more than needed (+2: the loop ends past bit_length(pos))
        top = tl.minimum((tl.log2((pos + 1).to(tl.float32)) + 2.0).to(tl.int32), L)
        if ALL_LEVELS:
            top = L
        for lvl in range(top):
            bit = tl.maximum(lvl - 1, 0)
            held = carry & ((lvl == 0) | (((prev >> bit) & 1) == 1))  # occupied before the step
            S = tl.load(base + lvl * KD * VD + tile, mask=held, other=0.0)
            merging = carry & (lvl < target)
            merged += tl.where(merging, S, 0.0)  # levels below target come first: complete at lvl == target
            S = tl.where(merging, 0.0, S) + tl.where(carry & (lvl == target), merged, 0.0)
            S = S * decay
            if HAS_BETA:
                S = S - beta * k[:, None] * tl.sum(S * k[:, None], 0)[None, :]
            S = tl.where(lvl == 0, k[:, None] * (beta * v)[None, :], S)
            after = (lvl == 0) | (((pos >> bit) & 1) == 1)  # occupied after it; merged-away slots become 0
            tl.store(dst + lvl * KD * VD + tile, S, mask=ALL_LEVELS | (ok & (after | merging)))
            o += tl.load(LAM + pid * L + lvl).to(tl.float32) * tl.sum(S * q[:, None], 0)
        return tl.where(ok, o * scale, 0.0)

    @triton.jit
    def _loglinear_step_kernel(Q, K, V, G_, BETA, LAM, SLOTS, DST, POS, VALID, OUT, H, L, scale,
                               KD: tl.constexpr, VD: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
                               HAS_BETA: tl.constexpr, HAS_VALID: tl.constexpr, ALL_LEVELS: tl.constexpr):
        """:func:`_loglinear_levels` of one (sequence, head, block of value columns) on given
        (q, k, v, g, beta); where VALID[n] is 0 no step."""
        pid = tl.program_id(0)  # n * H + h
        n = pid // H
        ok = True
        if HAS_VALID:
            ok = tl.load(VALID + n) != 0
        kk, vv = tl.arange(0, KD), tl.program_id(1) * BV + tl.arange(0, BV)
        q = tl.load(Q + pid * KD + kk).to(tl.float32)
        k = tl.load(K + pid * KD + kk).to(tl.float32)
        v = tl.load(V + pid * VD + vv).to(tl.float32)
        decay = 1.0
        beta = 1.0
        if HAS_G:
            decay = tl.exp(tl.load(G_ + pid).to(tl.float32))
        if HAS_BETA:
            beta = tl.load(BETA + pid).to(tl.float32)
        o = _loglinear_levels(q, k, v, decay, beta, ok, tl.load(POS + n), LAM, SLOTS, DST, pid, vv, L, scale, KD, VD,
                              BV, HAS_BETA, ALL_LEVELS)
        tl.store(OUT + pid * VD + vv, o)

    @triton.jit
    def _loglinear_step_cache_kernel(Q, KEYS, VALUES, RING_G, SLOT_POS, CURSOR, LAM, SLOTS, POS, OUT, STEPPED, H,
                                     n_kv_heads, L, sinks, window, scale, sqb, sqh, skb, skh, sks, svb, svh, svs,
                                     sgb, sgw, sgh, spb, KD: tl.constexpr, VD: tl.constexpr, BV: tl.constexpr,
                                     G_IDX: tl.constexpr, BETA_IDX: tl.constexpr, KSCALE_IDX: tl.constexpr):
        """:func:`_loglinear_levels` for the token leaving an AHN cache's window, read from its ring
        slot: key and value of its GQA group, L2-normalised q and k, write gates at their indices
        (-1: none; KSCALE_IDX scales k, Mamba-2's write strength); no step where the slot holds no
        real token past the sinks (its position < sinks)."""
        pid = tl.program_id(0)  # b * H + h
        b, h, _, vv, q, k, v, gates, ok = _evicted_token(Q, KEYS, VALUES, RING_G, CURSOR, SLOT_POS, pid, H,
                                                          n_kv_heads, sinks, window, sqb, sqh, skb, skh, sks, svb,
                                                          svh, svs, sgb, sgw, sgh, spb, tl.program_id(1) * BV, KD,
                                                          BV, True)
        q, k = _l2_normalized(q), _l2_normalized(k)
        decay = 1.0
        beta = 1.0
        if G_IDX >= 0:
            decay = tl.exp(tl.load(gates + G_IDX).to(tl.float32))
        if BETA_IDX >= 0:
            beta = tl.load(gates + BETA_IDX).to(tl.float32)
        if KSCALE_IDX >= 0:
            k = k * tl.load(gates + KSCALE_IDX).to(tl.float32)
        o = _loglinear_levels(q, k, v, decay, beta, ok, tl.load(POS + b), LAM, SLOTS, SLOTS, pid, vv, L, scale, KD,
                              VD, BV, BETA_IDX >= 0, False)
        tl.store(OUT + pid * VD + vv, o)
        # the position advances after the launch (here another program may still read it)
        tl.store(STEPPED + b, ok.to(tl.int64), mask=(h == 0) & (tl.program_id(1) == 0))


def _loglinear_step_fits(q, v, slots) -> bool:
    """Whether the log-linear step kernels take these inputs (``slots``: the state's, or None)."""
    return _step_fits(q, v, slots) and (slots is None or slots.is_contiguous())


def _loglinear_step_launch(q, k, v, g, beta, lam, slots, dst, position, valid, scale,
                           all_levels: bool) -> torch.Tensor:
    """The step kernel from ``slots`` into ``dst`` (the same tensor: in place; with ``all_levels``
    every level of ``dst`` is written); returns o [N, H, V] float32."""
    _runtime_loops_ready()
    N, H, K = q.shape
    V, L = v.shape[-1], lam.shape[-1]
    out = torch.empty(N, H, V, device=q.device, dtype=torch.float32)
    c = lambda x: x.contiguous()  # noqa: E731
    bv = min(V, STEP_BV)
    _loglinear_step_kernel[(N * H, V // bv)](
        c(q), c(k), c(v), slots if g is None else c(g.float()), slots if beta is None else c(beta.float()),
        c(lam.float()), slots, dst, position, out if valid is None else valid.to(torch.int32), out, H, L, scale,
        KD=K, VD=V, BV=bv, HAS_G=g is not None, HAS_BETA=beta is not None, HAS_VALID=valid is not None,
        ALL_LEVELS=all_levels, num_warps=STEP_WARPS)
    return out


def loglinear_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                    beta: torch.Tensor | None, lam: torch.Tensor, state, scale: float | None = None,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`hippolm.ops.loglinear.step_unchecked` updating ``state`` (a LogLinearState: float32
    slots [N, H, L, K, V], positions [N]) in place, so a decode step replays from a CUDA graph; one
    kernel per layer on CUDA (the Fenwick carry, decay, delta rule, write and level-weighted read
    over each occupied level slot once). q, k [N, H, K], v [N, H, V], g/beta [N, H] or None, lam
    [N, H, L]; ``valid`` [N] bool or None (all): sequences where it is False take no step (slots and
    position unchanged, o = 0), as where nothing leaves an AHN cache's window. Returns o [N, H, V] in
    q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _loglinear_step_fits(q, v, state.slots):
        out = _loglinear_step_launch(q, k, v, g, beta, lam, state.slots, state.slots, state.position, valid, scale,
                                     False)
        state.position.add_(1 if valid is None else valid.to(state.position.dtype))
        return out.to(q.dtype)
    return loglinear_step_reference_(q, k, v, g, beta, lam, state, scale, valid)


def loglinear_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                   beta: torch.Tensor | None, lam: torch.Tensor, state, scale: float | None = None):
    """:func:`hippolm.ops.loglinear.step_unchecked` as a new state (the input one is left as it is),
    one kernel on CUDA: every level slot of the new state is written once (zeros where empty), only
    the occupied ones of the old are read. Returns (o [N, H, V] in q's dtype, new LogLinearState)."""
    N, H, K = q.shape
    V, L = v.shape[-1], lam.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    if _loglinear_step_fits(q, v, None if state is None else state.slots):
        new = torch.empty(N, H, L, K, V, device=q.device, dtype=torch.float32)
        pos = torch.zeros(N, dtype=torch.long, device=q.device) if state is None else state.position.to(q.device)
        old = new if state is None else state.slots  # position 0: nothing is read
        out = _loglinear_step_launch(q, k, v, g, beta, lam, old, new, pos, None, scale, True)
        return out.to(q.dtype), LogLinearState(new, pos + 1)
    return step_unchecked(q, k, v, g, beta, lam, state, scale, check_levels=False)


def loglinear_step_reference_(q, k, v, g, beta, lam, state, scale, valid=None) -> torch.Tensor:
    """:func:`loglinear_step_` in torch (step_unchecked, then where ``valid`` and an in-place copy)."""
    o, new = step_unchecked(q, k, v, g, beta, lam, state, scale, check_levels=False)
    if valid is not None:
        new = type(state)(torch.where(valid[:, None, None, None, None], new.slots, state.slots.to(new.slots.dtype)),
                          torch.where(valid, new.position, state.position))
        o = o * valid[:, None, None]
    state.copy_(new)
    return o


def loglinear_step_from_cache_reference(q, keys, values, ring_gates, slot_pos, cursor, sinks, window, g_idx,
                                        beta_idx, kscale_idx, lam, state, scale=None):
    k, v, wg, slot = evicted_entry(keys, values, ring_gates, cursor, sinks, window)
    valid = slot_pos.gather(1, slot[:, None])[:, 0] >= sinks
    rep = q.shape[1] // keys.shape[1]
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    q = F.normalize(q.to(cd), dim=-1)
    k = F.normalize(k.repeat_interleave(rep, 1).to(cd), dim=-1)
    v, wg = v.repeat_interleave(rep, 1).to(cd), wg.to(cd)
    if kscale_idx >= 0:
        k = k * wg[..., kscale_idx, None]
    g = wg[..., g_idx] if g_idx >= 0 else None
    beta = wg[..., beta_idx] if beta_idx >= 0 else None
    return loglinear_step_reference_(q, k, v, g, beta, lam.to(cd), state, scale, valid)


def loglinear_step_from_cache_(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ring_gates: torch.Tensor,
                               slot_pos: torch.Tensor, cursor: torch.Tensor, sinks: int, window: int, g_idx: int,
                               beta_idx: int, kscale_idx: int, lam: torch.Tensor, state,
                               scale: float | None = None) -> torch.Tensor:
    """:func:`loglinear_step_` for the token leaving an AHN cache's window at stream index ``cursor``
    [B], read from its ring slot as :func:`memory_step_from_cache` does (keys/values [B, Hkv, sinks +
    window, d] shared by the query heads of a GQA group, write gates ``ring_gates`` [B, window, H, G]:
    log decay at ``g_idx``, delta-rule strength at ``beta_idx``, a scale of k at ``kscale_idx``; -1:
    none), with q [B, H, K] and that key L2-normalised. Where the slot holds no real token past the
    sinks (``slot_pos`` [B, sinks + window] < sinks: filling, padding, a sink's ring copy) no step:
    slots and position kept, read 0. One kernel on CUDA (plus the position's add); returns the read
    [B, H, V] float32 (float64 for float64 inputs)."""
    B, H, K = q.shape
    V, L = values.shape[-1], lam.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    slots = state.slots
    if (_loglinear_step_fits(q, values, slots) and _triton_ok(keys) and H % keys.shape[1] == 0
            and q.stride(-1) == keys.stride(-1) == values.stride(-1) == 1 and ring_gates.stride(-1) == 1
            and slot_pos.stride(-1) == 1):
        _runtime_loops_ready()
        out = torch.empty(B, H, V, device=q.device, dtype=torch.float32)
        stepped = torch.empty(B, device=q.device, dtype=torch.long)
        bv = min(V, STEP_BV)
        _loglinear_step_cache_kernel[(B * H, V // bv)](
            q, keys, values, ring_gates, slot_pos, cursor, lam.float().contiguous(), slots, state.position, out,
            stepped, H, keys.shape[1], L, sinks, window, scale, q.stride(0), q.stride(1), keys.stride(0),
            keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2), ring_gates.stride(0),
            ring_gates.stride(1), ring_gates.stride(2), slot_pos.stride(0), KD=K, VD=V, BV=bv, G_IDX=g_idx,
            BETA_IDX=beta_idx, KSCALE_IDX=kscale_idx, num_warps=STEP_WARPS)
        state.position.add_(stepped)
        return out
    return loglinear_step_from_cache_reference(q, keys, values, ring_gates, slot_pos, cursor, sinks, window, g_idx,
                                               beta_idx, kscale_idx, lam, state, scale)


__all__ = ["cache_attention", "cache_visible", "cache_write", "cache_write_reference", "decode_attention",
           "decode_attention_reference", "evicted_entry", "evicted_slot", "loglinear_step", "loglinear_step_",
           "loglinear_step_from_cache_", "loglinear_step_from_cache_reference", "loglinear_step_reference_",
           "memory_step", "memory_step_from_cache", "memory_step_from_cache_reference", "memory_step_reference",
           "recurrent_step"]
