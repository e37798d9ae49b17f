"""Log-linear (Fenwick-tree) attention over the Mamba-2 and Gated DeltaNet transitions.

Positions are 0-indexed. A query t sees key s <= t at level ``level(t, s) = bit_length(t ^ s)``
(0 for s == t); level l >= 1 holds the aligned block of 2^(l-1) keys just before
``t - t mod 2^(l-1)`` when bit l-1 of t is set. With P(t, s) the product of transitions between
s and t (scalar decays for Mamba-2, decayed Householder steps for Gated DeltaNet):

    o_t = scale * sum_{s <= t} lam[t, level(t, s)] * q_t^T P(t, s) w_s v_s^T      (w_s = beta_s or 1)

so equal ``lam`` across levels gives the linear op scaled by that value. Three forms:
``naive`` (O(T^2) masked matrix, the oracle), ``recurrent`` (O(log T) level states per sequence,
with a per-sequence token counter, batch-safe) and ``chunk`` (O(T log T): one dense block per
chunk plus one inter-chunk pass per level above the chunk). Levels are computed with integer bit
operations; a sequence longer than the levels cover is an error, never a silent truncation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import reference, triton_backend
from ._checks import check_finite, check_sequence_inputs, check_step_inputs
from .reference import compute_dtype, resolve_scale, to_blocks


@dataclass
class LogLinearState:
    """Decode state of a log-linear op for N sequences.

    ``slots[:, :, l]`` holds the keys of level l of the last query's Fenwick partition (slot 0:
    the last token); ``position`` counts the tokens each sequence has consumed.
    """

    slots: torch.Tensor  # [N, H, L, K, V]
    position: torch.Tensor  # [N] int64

    @property
    def num_levels(self) -> int:
        return self.slots.shape[2]

    def copy_(self, other: LogLinearState) -> LogLinearState:
        """Take ``other``'s values in place (as Tensor.copy_): the buffers a captured decode step
        keeps updating."""
        self.slots.copy_(other.slots)
        self.position.copy_(other.position)
        return self


def num_levels(max_len: int) -> int:
    """Levels needed for sequences of up to ``max_len`` tokens: ceil(log2 max_len) + 1."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}.")
    return (max_len - 1).bit_length() + 1


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Integer bit length of a non-negative int64 tensor: the float64 exponent of its exact conversion
    (positions are far below 2^53), so exact at every power of two, unlike a float log2; one op, and
    no read of ``x.max()`` (a device sync, which a CUDA graph cannot hold)."""
    return torch.frexp(x.double()).exponent.to(x.dtype)


def block_start(last: torch.Tensor, level: int) -> torch.Tensor:
    """First position of the level-``level`` block of query ``last`` (slot 0: ``last`` itself)."""
    if level == 0:
        return last
    half = 1 << (level - 1)
    return last - last % half - half


def _slot_occupied(last: torch.Tensor, level: int) -> torch.Tensor:
    """Whether query ``last`` (-1: nothing seen yet) has a non-empty level-``level`` block."""
    if level == 0:
        return last >= 0
    return (last >= 0) & (((last >> (level - 1)) & 1) == 1)


def occupied_levels(position: torch.Tensor, levels: int) -> torch.Tensor:
    """Which level slots [N, levels] of a state at ``position`` [N] (tokens written) can be non-empty:
    level 0 holds the last token, level l >= 1 the block of bit l-1 of position-1 (the Fenwick
    partition of the tokens before it). Every op leaves the other slots zero, and the fused decode
    step (:func:`hippolm.ops.decode.loglinear_step_`) neither reads nor writes them."""
    last = position.long() - 1
    return torch.stack([_slot_occupied(last, lvl) for lvl in range(levels)], -1)


# ---------------------------------------------------------------------------------------------
# Validation


def _check(q, k, v, g, beta, lam, initial_state, cu_seqlens, scale) -> tuple[int, torch.Tensor]:
    """Validate; return (N, start positions [N])."""
    n = check_sequence_inputs(q, k, v, {"g": g, "beta": beta}, None, cu_seqlens, scale, finite=False)
    B, T, H, K = q.shape
    if not isinstance(lam, torch.Tensor) or lam.ndim != 4 or lam.shape[:3] != (B, T, H):
        shape = tuple(lam.shape) if isinstance(lam, torch.Tensor) else type(lam).__name__
        raise ValueError(f"lam must have shape [batch, time, heads, levels] with {(B, T, H)} leading, got {shape}.")
    if not lam.dtype.is_floating_point:
        raise ValueError(f"lam must be a floating tensor, got {lam.dtype}.")
    if lam.device != q.device:
        raise ValueError(f"lam must be on {q.device}, got {lam.device}.")
    check_finite({"g": g, "beta": beta, "lam": lam})
    L = lam.shape[-1]
    if initial_state is None:
        start = torch.zeros(n, dtype=torch.long, device=q.device)
    else:
        if not isinstance(initial_state, LogLinearState):
            raise ValueError(f"initial_state must be a LogLinearState, got {type(initial_state).__name__}.")
        want = (n, H, L, K, v.shape[-1])
        if tuple(initial_state.slots.shape) != want:
            raise ValueError(f"initial_state.slots must have shape [sequences, heads, levels, k_dim, v_dim] = "
                             f"{want}, got {tuple(initial_state.slots.shape)}.")
        if tuple(initial_state.position.shape) != (n,):
            got = tuple(initial_state.position.shape)
            raise ValueError(f"initial_state.position must have shape [{n}], got {got}.")
        if initial_state.slots.device != q.device:
            raise ValueError(f"initial_state.slots must be on {q.device} (the inputs' device), got "
                             f"{initial_state.slots.device}; move the state with .to() as well.")
        start = initial_state.position.to(device=q.device, dtype=torch.long)
    if initial_state is None and cu_seqlens is None:  # known on the host: no device sync
        last = T - 1
    else:
        lengths = (cu_seqlens.diff().to(start.device) if cu_seqlens is not None
                   else torch.full((n,), T, dtype=torch.long, device=start.device))
        last = int((start + lengths).max()) - 1
    if last >= 1 << (L - 1):
        raise ValueError(f"position {last} needs {num_levels(last + 1)} levels but lam has {L}; "
                         f"configure num_levels >= {num_levels(last + 1)} (covers {1 << (num_levels(last + 1) - 1)} "
                         f"tokens).")
    return n, start


# ---------------------------------------------------------------------------------------------
# Step and recurrent forms


def _check_levels(pos: torch.Tensor, L: int) -> None:
    """A step at ``pos`` [N] needs pos < 2^(L-1) (a device sync)."""
    if pos.numel() and int(pos.max()) >= 1 << (L - 1):
        raise ValueError(f"a sequence reached position {int(pos.max())}, beyond the {1 << (L - 1)} tokens that "
                         f"{L} levels cover; configure more levels.")


def _step(q, k, v, g, beta, lam, state, scale):
    """The checked decode step: one kernel on CUDA (:func:`hippolm.ops.decode.loglinear_step`)."""
    from .decode import loglinear_step  # decode builds on this module

    _check_step(q, k, v, g, beta, lam, state)
    if state is not None:
        _check_levels(state.position, lam.shape[-1])
    return loglinear_step(q, k, v, g, beta, lam, state, scale)


def step_unchecked(q, k, v, g, beta, lam, state: LogLinearState | None, scale, check_levels: bool = True):
    """One step without argument checks. ``check_levels=False`` also skips the level-overflow check
    (a device sync): for callers that track positions on the host (the AHN cache)."""
    N, H, K = q.shape
    V, L = v.shape[-1], lam.shape[-1]
    cd = compute_dtype(q.dtype)
    scale = resolve_scale(scale, K)
    if state is None:
        slots = q.new_zeros(N, H, L, K, V, dtype=cd)
        pos = torch.zeros(N, dtype=torch.long, device=q.device)
    else:
        slots, pos = state.slots.to(cd), state.position.to(q.device)
    if check_levels:
        _check_levels(pos, L)
    # Carry: going from query t-1 to t, slots 0..z merge into slot z+1 = level(t, t-1).
    target = bit_length(pos ^ (pos - 1).clamp_min(0))  # [N], <= L as pos < 2^(L-1); unused where pos == 0
    levels = torch.arange(L, device=q.device)
    merging = (levels[None] < target[:, None]) & (pos[:, None] > 0)  # [N, L]
    merged = (slots * merging[:, None, :, None, None]).sum(2)
    into = (levels[None] == target[:, None]) & (pos[:, None] > 0)
    slots = slots * ~merging[:, None, :, None, None] + into[:, None, :, None, None] * merged[:, :, None]
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    if g is not None:
        slots = slots * g.to(cd).exp()[..., None, None, None]
    if beta is not None:
        b = beta.to(cd)
        pred = torch.einsum("nhlkv,nhk->nhlv", slots, kc)
        slots = slots - b[..., None, None, None] * kc[:, :, None, :, None] * pred[:, :, :, None, :]
        vc = vc * b[..., None]
    slots = slots.clone()
    slots[:, :, 0] = kc[..., :, None] * vc[..., None, :]
    o = torch.einsum("nhlkv,nhk,nhl->nhv", slots, qc, lam.to(cd)) * scale
    return o.to(q.dtype), LogLinearState(slots, pos + 1)


def _recurrent(q, k, v, g, beta, lam, scale, initial_state, cu_seqlens):
    _B, _T, H, K = q.shape
    L, V = lam.shape[-1], v.shape[-1]
    if cu_seqlens is None:  # all sequences step together; positions may differ (batch-safe step)
        groups = [(slice(None), slice(None), initial_state)]
    else:
        offsets = cu_seqlens.tolist()
        groups = [(0, slice(s, e), None if initial_state is None else LogLinearState(
            initial_state.slots[i : i + 1], initial_state.position[i : i + 1]))
            for i, (s, e) in enumerate(itertools.pairwise(offsets))]
    outs, finals = [], []
    for b, sl, state in groups:
        xs = [None if x is None else (x[b, sl] if cu_seqlens is not None else x)
              for x in (q, k, v, g, beta, lam)]
        if cu_seqlens is not None:
            xs = [None if x is None else x[None] for x in xs]
        for t in range(xs[0].shape[1]):
            o, state = step_unchecked(*(None if x is None else x[:, t] for x in xs), state, scale)
            outs.append(o)
        if state is None:  # an empty packed sequence and no initial state
            state = LogLinearState(q.new_zeros(1, H, L, K, V, dtype=compute_dtype(q.dtype)),
                                   torch.zeros(1, dtype=torch.long, device=q.device))
        finals.append(state)
    o = torch.stack(outs, 1) if cu_seqlens is None else torch.cat(outs)[None]
    final = LogLinearState(torch.cat([f.slots for f in finals]), torch.cat([f.position for f in finals]))
    return o, final


# ---------------------------------------------------------------------------------------------
# Naive O(T^2) form (the oracle)


def _naive(q, k, v, g, beta, lam, scale, initial_state, cu_seqlens, start):
    B, T, H, _K = q.shape
    cd = compute_dtype(q.dtype)
    out = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype, device=q.device)
    for idx, (b, s, e) in enumerate(reference._sequence_bounds(T, cu_seqlens, B)):
        if e == s:
            continue
        sl = slice(s, e)
        qs, ks, vs, lams = q[b, sl][None].to(cd), k[b, sl][None].to(cd), v[b, sl][None].to(cd), lam[b, sl].to(cd)
        gs = None if g is None else g[b, sl][None]
        bs = None if beta is None else beta[b, sl][None]
        n_tok = e - s
        # The linear op on one-hot values gives its attention matrix A[t, s] = scale q_t^T P(t,s) w_s k_s.
        onehot = torch.eye(n_tok, dtype=cd, device=q.device)[None, :, None, :].expand(1, n_tok, H, n_tok)
        A = reference.recurrent(qs, ks, onehot, gs, bs, scale)[0][0]  # [t, H, s]
        pos = int(start[idx]) + torch.arange(n_tok, device=q.device)
        level = bit_length(pos[:, None] ^ pos[None, :])  # [t, s]
        mask = lams.gather(-1, level[:, None, :].expand(n_tok, H, n_tok))  # lam[t, h, level(t, s)]
        o = torch.einsum("ths,shv->thv", A * mask, vs[0])
        if initial_state is not None:
            last = start[idx : idx + 1] - 1
            for lvl in range(lam.shape[-1]):
                if not bool(_slot_occupied(last, lvl)):
                    continue
                S = initial_state.slots[idx : idx + 1, :, lvl].to(cd)
                zeros = torch.zeros_like(vs)
                read = reference.recurrent(qs, ks, zeros, gs, bs, scale, initial_state=S)[0][0]  # [t, H, V]
                lvl_t = bit_length(pos ^ block_start(last, lvl))
                o = o + read * lams.gather(-1, lvl_t[:, None, None].expand(n_tok, H, 1))
        out[b, sl] = o.to(q.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Chunkwise O(T log T) form


def _tree_summaries(f: reference.ChunkFactors, u: torch.Tensor) -> tuple[list, list]:
    """Per height h, every aligned block of 2^h chunks' transition T ([N, H, n >> h, K, K], or
    [.., 1, 1] without the delta rule: a decay) and writes carried to its end D ([.., K, V]); a
    parent from its halves: T = T_right T_left, D = T_right D_left + D_right (an odd last block has
    no partner: no one reads past it)."""
    N, H, n, _, K = f.q_eff.shape
    kT = f.k_end.transpose(-1, -2)
    gamma = u.new_ones(N, H, n) if f.gamma_end is None else f.gamma_end
    T = gamma[..., None, None] * (1 if f.w is None else torch.eye(K, dtype=u.dtype, device=u.device))
    T = T if f.w is None else T - kT @ f.w
    apply = _transition(f)
    Ts, Ds = [T], [kT @ u]
    while Ts[-1].shape[2] > 1:
        T, D = Ts[-1], Ds[-1]
        m = T.shape[2] // 2
        right = T[:, :, 1 : 2 * m : 2]
        Ts.append(apply(right, T[:, :, 0 : 2 * m : 2]))
        Ds.append(apply(right, D[:, :, 0 : 2 * m : 2]) + D[:, :, 1 : 2 * m : 2])
    return Ts, Ds


def _transition(f: reference.ChunkFactors):
    """How a summary's T applies: a matrix product with the delta rule, else a decay's product."""
    return torch.mul if f.w is None else torch.matmul


def _tree_reads(f: reference.ChunkFactors, u: torch.Tensor, lamb: torch.Tensor, c_bits: int,
                summary_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every chunk's reads of the chunk levels (chunk 0 at position 0; u [N, H, n, C, V], lamb the
    level weights [N, H, n, C, L]) through a binary tree of block summaries: for each aligned block
    of 2^h chunks, D (its writes carried to its end, from a zero state) and T (its transition,
    [K, K]: S at its end = T S at its start + D), each from its two halves. Chunk level j of chunk i
    (bit j set) is the block of 2^j chunks ending at i >> j << j, carried to chunk i through the
    blocks of i's lower set bits; so chunk i reads its set bits from the lowest up, its query
    carried through each block it has read: ``o += lam_j q D_j; q <- q T_j``. O(n) summaries and
    one batched step per level, instead of one state per level carried through every chunk.
    ``summary_dtype``: round the summaries read to it (what a kernel storing them so would lose)."""
    N, H, n, C, _ = f.q_eff.shape
    Ts, Ds = _tree_summaries(f, u)
    apply = _transition(f)
    if summary_dtype is not None:
        Ts, Ds = ([x.to(summary_dtype).to(x.dtype) for x in xs] for xs in (Ts, Ds))
    ci = torch.arange(n, device=u.device)
    out = u.new_zeros(N, H, n, C, u.shape[-1])
    q = f.q_eff
    for j in range((n - 1).bit_length()):
        i = ci[((ci >> j) & 1).bool()]  # the chunks that read level j
        node = (i >> j) - 1  # the block of 2^j chunks just before i >> j << j
        qi = q[:, :, i]
        out = out.index_add(2, i, lamb[:, :, i, :, c_bits + 1 + j, None] * (qi @ Ds[j][:, :, node]))
        q = q.index_copy(2, i, apply(qi, Ts[j][:, :, node]))
    return out


class _Virtual(NamedTuple):
    """Sequences continuing at positions p_n > 0 laid out for kernels that start at position 0."""

    index: torch.Tensor  # [N, width] flat (batch * T) index of the token at each virtual position
    valid: torch.Tensor  # [N, width] a real token there (else zero padding)
    colmap: torch.Tensor  # [N, Lv] lam column of each virtual level
    colok: torch.Tensor  # [N, Lv] that column exists
    real_pos: torch.Tensor  # [N, width] absolute position of each virtual position (pads too)
    bounds: list  # (batch row, start, end) per sequence

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] (or [1, T, ...] packed) -> [N, width, ...] in this layout, zeros elsewhere."""
        out = x.new_zeros(*self.valid.shape, *x.shape[2:])
        out[self.valid] = x.reshape(-1, *x.shape[2:])[self.index[self.valid]]
        return out

    def levels(self, lam: torch.Tensor) -> torch.Tensor:
        """Packed level weights [N, width, H, L] -> the virtual layout's columns [N, width, H, Lv]."""
        N, width, H = lam.shape[:3]
        Lv = self.colmap.shape[1]
        return lam.gather(-1, self.colmap[:, None, None, :].expand(N, width, H, Lv)) * self.colok[:, None, None, :]


def _virtual_layout(q: torch.Tensor, cu_seqlens, C: int, L: int, starts: list[int], multiple: int = 1) -> _Virtual:
    """The layout of sequences continuing from positions ``starts`` on kernels that start at 0
    (``multiple``: its width rounded up to a multiple of it).

    New tokens' levels depend on absolute positions. With F = p // C the first absolute chunk and
    n chunks spanned, m = bit_length(n - 1) and R = F mod 2^m, the chunk indices R.. in a virtual
    sequence have the low m bits of the absolute ones; pairs that straddle the 2^m boundary all
    differ highest at bit m virtually and at bit m + bit_length(A ^ (A + 1)) - 1 (A = F >> m) really,
    so the kernel runs on the virtual layout (R chunks + p mod C tokens of zero padding in front:
    no writes, no decay, identity transitions) with that one lam column remapped.
    """
    B, T = q.shape[:2]
    CB = C.bit_length() - 1
    bounds = ([(b, 0, T) for b in range(B)] if cu_seqlens is None
              else [(0, s, e) for s, e in itertools.pairwise(cu_seqlens.tolist())])
    layout = []  # (prefix length, lam column map) per sequence
    for (_, s, e), p in zip(bounds, starts, strict=True):
        first, off = divmod(p, C)
        n = max(1, -(-(off + e - s) // C))
        m = (n - 1).bit_length()
        high = first >> m
        cols = list(range(CB + 2 + m))
        cols[CB + 1 + m] = CB + 1 + m + (high ^ (high + 1)).bit_length() - 1  # the straddling pairs' real level
        cols = [min(c, L - 1) for c in cols]  # columns past L are never reached by real pairs
        layout.append(((first % (1 << m)) * C + off, cols))
    width = max(1, *(pre + e - s for (pre, _), (_, s, e) in zip(layout, bounds, strict=True)))
    width = -(-width // multiple) * multiple
    Lv = max(len(cols) for _, cols in layout)
    N = len(bounds)
    index = torch.zeros(N, width, dtype=torch.long, device=q.device)
    valid = torch.zeros(N, width, dtype=torch.bool, device=q.device)
    colmap = torch.zeros(N, Lv, dtype=torch.long, device=q.device)
    colok = torch.zeros(N, Lv, dtype=torch.bool, device=q.device)
    real_pos = torch.zeros(N, width, dtype=torch.long, device=q.device)
    for n, ((pre, cols), (b, s, e), p) in enumerate(zip(layout, bounds, starts, strict=True)):
        index[n, pre : pre + e - s] = b * T + torch.arange(s, e, device=q.device)
        valid[n, pre : pre + e - s] = True
        colmap[n, : len(cols)] = torch.tensor(cols, device=q.device)
        colok[n, : len(cols)] = True
        real_pos[n] = p - pre + torch.arange(width, device=q.device)
    return _Virtual(index, valid, colmap, colok, real_pos, bounds)


def _chunk(q, k, v, g, beta, lam, scale, initial_state, output_final_state, cu_seqlens, start, C):
    if C & (C - 1):
        raise ValueError(f"chunk_size must be a power of two for log-linear ops, got {C}.")
    B, T, H, K = q.shape
    V, L = v.shape[-1], lam.shape[-1]
    cd = compute_dtype(q.dtype)
    scale = resolve_scale(scale, K)
    dev = q.device
    # Align chunks to absolute positions in the virtual layout (zero tokens in front: no writes, no
    # decay, identity transitions; one level column remapped), so every sequence starts at chunk 0
    # and the chunk levels are the tree's reads; the old slots are read at their real levels.
    lay = _virtual_layout(q, cu_seqlens, C, L, start.tolist(), multiple=C)
    N, Tp = lay.valid.shape
    n_chunks = Tp // C
    pos = lay.real_pos  # [N, Tp] absolute positions
    qp, kp, vp, gp, bp = (None if x is None else lay.pack(x) for x in (q, k, v, g, beta))
    lam_real = lay.pack(lam).to(cd)  # [N, Tp, H, L] at real levels (0 at the padding)
    lamv = lay.levels(lam_real)
    # Enough level columns for every chunk level of the virtual layout (real pairs never exceed L - 1).
    L_pad = max(L, lamv.shape[-1], C.bit_length() + (n_chunks - 1).bit_length())
    lamp = F.pad(lamv, (0, L_pad - lamv.shape[-1]))
    f = reference.chunk_factors(qp.to(cd) * scale, kp.to(cd), None if gp is None else gp.to(cd),
                                None if bp is None else bp.to(cd), C)
    vb = to_blocks(vp.to(cd), C)  # [N, H, n, C, V]
    u = f.pseudo_values(vb)
    lamb = to_blocks(lamp, C)  # [N, H, n, C, L_pad]
    c_bits = C.bit_length() - 1

    # Intra-chunk: levels 0..log2(C) are the same in every aligned chunk.
    r = torch.arange(C, device=dev)
    lvl_in = bit_length(r[:, None] ^ r[None, :])
    lam_in = lamb.gather(-1, lvl_in.expand(*lamb.shape[:3], C, C))
    attn_full = f.attn if f.mix is None else f.attn @ f.mix
    o = (attn_full * lam_in) @ vb  # [N, H, n, C, V]

    # Inter-chunk: every chunk level through the tree of block summaries (virtual chunk 0 at position 0).
    o = o + _tree_reads(f, u, lamb, c_bits)
    carried = None
    if initial_state is not None:
        # Every slot of the initial state is one aligned block; blocks only merge later, so all its
        # keys share one level for every later query: query t reads slot S as lam q_t^T A S, A the
        # new tokens' transitions up to t. P_c (the transitions before chunk c) is carried from the
        # identity, [K, K] whatever the number of slots, and every slot is read by the query q_eff P_c.
        last = start - 1
        starts = torch.stack([block_start(last, lv) for lv in range(L)], 1)  # [N, L]
        occupied = torch.stack([_slot_occupied(last, lv) for lv in range(L)], 1)
        S = initial_state.slots.to(cd) * occupied[:, None, :, None, None]  # [N, H, L, K, V]
        P = torch.eye(K, dtype=cd, device=dev).expand(N, H, K, K)
        xs = []
        for i in range(n_chunks):
            xs.append(f.q_eff[:, :, i] @ P)
            P = f.carry(P, i)
        x = torch.stack(xs, 2)  # [N, H, n, C, K]
        lvl = bit_length(pos[:, :, None] ^ starts.clamp_min(0)[:, None, :])  # [N, Tp, L]
        lvl = to_blocks(lvl[:, :, None].expand(N, Tp, H, L), C)
        coef = to_blocks(lam_real, C).gather(-1, lvl.clamp_max(L - 1))  # [N, H, n, C, L] at the real levels
        for lv in range(L):
            o = o + coef[..., lv, None] * (x @ S[:, :, lv, None])
        carried = (P[:, :, None] @ S, starts, occupied)

    o = o.permute(0, 2, 3, 1, 4).reshape(N, Tp, H, V)[lay.valid]  # [total, H, V] in order
    o = o[None] if cu_seqlens is not None else o.reshape(B, T, H, V)
    if not output_final_state:
        return o.to(q.dtype), None

    # Final slots: bucket the new keys by their level to the last query, in one stacked pass.
    end = start + lay.valid.sum(1)
    last_q = (end - 1)[:, None]
    real = (pos >= start[:, None]) & (pos < end[:, None])
    key_level = torch.where(real, bit_length((last_q ^ pos).clamp_min(0)), -1)  # [N, Tp]
    masks = (key_level[..., None] == torch.arange(L, device=dev)).to(cd)  # [N, Tp, L]
    vm = to_blocks((vp.to(cd)[..., None, :] * masks[:, :, None, :, None]).reshape(N, Tp, H, L * V), C)
    um = f.pseudo_values(vm)
    S = q.new_zeros(N, H, K, L * V, dtype=cd)
    for i in range(n_chunks):
        S = f.carry(S, i) + f.write(um[:, :, i], i)
    slots = S.reshape(N, H, K, L, V).permute(0, 1, 3, 2, 4).contiguous()
    if carried is not None:
        S_old, starts, occupied = carried
        old_level = bit_length((last_q ^ starts.clamp_min(0)).clamp_min(0))  # [N, L]
        route = F.one_hot(old_level.clamp_max(L - 1), L).to(cd) * occupied[..., None]  # [N, from, to]
        slots = slots + torch.einsum("nhlkv,nlm->nhmkv", S_old, route)
    return o.to(q.dtype), LogLinearState(slots, end)


# ---------------------------------------------------------------------------------------------
# Public entry points


def _run(q, k, v, g, beta, lam, scale, initial_state, output_final_state, cu_seqlens, mode, chunk_size,
         backend="auto"):
    _, start = _check(q, k, v, g, beta, lam, initial_state, cu_seqlens, scale)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}.")
    if backend != "torch":
        op = "ssd" if beta is None else "gated_delta_rule"
        ok, why = triton_backend.plan_loglinear(op, q, v, initial_state, mode, explicit=backend == "triton")
        if ok and beta is not None:
            o, slots, lengths = triton_backend.run_loglinear_delta(
                q, k, v, g, beta, lam, resolve_scale(scale, q.shape[-1]), output_final_state, cu_seqlens, chunk_size,
                initial_state)
            if slots is None:
                return o, None
            return o, LogLinearState(slots, torch.tensor(lengths, dtype=torch.long, device=q.device))
        if ok:
            o, slots, lengths = triton_backend.run_loglinear_ssd(
                q, k, v, g, lam, resolve_scale(scale, q.shape[-1]), output_final_state, cu_seqlens, chunk_size,
                initial_state)
            if slots is None:
                return o, None
            return o, LogLinearState(slots, torch.tensor(lengths, dtype=torch.long, device=q.device))
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run this call: {why}. Use backend='auto'.")
    if mode == "chunk":
        return _chunk(q, k, v, g, beta, lam, scale, initial_state, output_final_state, cu_seqlens, start,
                      chunk_size)
    if mode == "recurrent":
        o, final = _recurrent(q, k, v, g, beta, lam, scale, initial_state, cu_seqlens)
        return o, (final if output_final_state else None)
    if mode == "naive":
        if output_final_state:
            raise ValueError("mode='naive' returns outputs only; use mode='recurrent' or 'chunk' for states.")
        return _naive(q, k, v, g, beta, lam, scale, initial_state, cu_seqlens, start), None
    raise ValueError(f"mode must be 'chunk', 'recurrent' or 'naive', got {mode!r}.")


def loglinear_ssd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    lam: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: LogLinearState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, LogLinearState | None]:
    """Log-linear Mamba-2: ``o_t = scale sum_s lam[t, level(t,s)] (prod_{r=s+1..t} a_r) (q_t . k_s) v_s``.

    Args as :func:`hippolm.ops.ssd`, plus ``lam`` [B, T, H, L]: per-token, per-head weight of
    each level (L = :func:`num_levels` of the longest sequence). States are
    :class:`LogLinearState`; ``mode`` is ``"chunk"``, ``"recurrent"`` or ``"naive"`` (outputs only).
    ``backend``: ``"auto"`` runs our Triton kernels (:mod:`hippolm.ops.triton_backend`) where they
    are right for the call (CUDA, chunk mode; initial states at any position), else the reference; ``"torch"``
    forces the reference, ``"triton"`` demands the kernels.
    """
    return _run(q, k, v, g, None, lam, scale, initial_state, output_final_state, cu_seqlens, mode, chunk_size,
                backend)


def loglinear_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    lam: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: LogLinearState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, LogLinearState | None]:
    """Log-linear Gated DeltaNet: the hierarchical mask of :func:`loglinear_ssd` applied to the
    gated delta rule's attention matrix (exact: scalar weights commute with the transitions)."""
    return _run(q, k, v, g, beta, lam, scale, initial_state, output_final_state, cu_seqlens, mode, chunk_size,
                backend)


def _check_step(q, k, v, g, beta, lam, state):
    check_step_inputs(q, k, v, {"g": g, "beta": beta}, None)
    if not isinstance(lam, torch.Tensor) or lam.ndim != 3 or lam.shape[:2] != q.shape[:2]:
        shape = tuple(lam.shape) if isinstance(lam, torch.Tensor) else type(lam).__name__
        raise ValueError(f"lam must have shape [batch, heads, levels] with {tuple(q.shape[:2])} leading, got {shape}.")
    if state is not None:
        want = (q.shape[0], q.shape[1], lam.shape[-1], q.shape[-1], v.shape[-1])
        if not isinstance(state, LogLinearState) or tuple(state.slots.shape) != want:
            raise ValueError(f"state must be a LogLinearState with slots of shape {want}.")


def loglinear_ssd_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, lam: torch.Tensor,
    state: LogLinearState | None, scale: float | None = None,
) -> tuple[torch.Tensor, LogLinearState]:
    """One decode step, O(log T): q, k [B, H, K], v [B, H, V], g [B, H], lam [B, H, L].

    Sequences in the batch may be at different positions (``state.position``)."""
    return _step(q, k, v, g, None, lam, state, scale)


def loglinear_gated_delta_rule_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, lam: torch.Tensor,
    state: LogLinearState | None, scale: float | None = None,
) -> tuple[torch.Tensor, LogLinearState]:
    """One decode step of :func:`loglinear_gated_delta_rule` (shapes as :func:`loglinear_ssd_step`)."""
    return _step(q, k, v, g, beta, lam, state, scale)
