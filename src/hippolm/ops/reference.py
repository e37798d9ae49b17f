"""Plain-PyTorch reference forms of the gated delta family of recurrences.

One state S (k_dim x v_dim) per sequence and head. With a_t = exp(g_t):

    Mamba-2 / SSD:     S_t = a_t S_{t-1} + k_t v_t^T
    DeltaNet:          S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
    Gated DeltaNet:    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
    output:            o_t = scale * S_t^T q_t   (inclusive of token t)

All three are the same recurrence with the decay (``g``) and/or the delta correction (``beta``)
switched off, so one implementation serves them. Three forms compute the same function:
``recurrent`` (token by token, the oracle), ``chunk`` (chunkwise parallel, for training and
prefill) and ``step`` (one decode step). Everything runs on any device and in float64; half
inputs are computed in float32 and states are kept in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_scale(scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


def step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    state: torch.Tensor | None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for every sequence: q, k [B, H, K], v [B, H, V], g, beta [B, H], state [B, H, K, V].

    Returns (o [B, H, V] in q's dtype, new state in the compute dtype).
    """
    cd = compute_dtype(q.dtype)
    scale = resolve_scale(scale, q.shape[-1])
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    if state is None:
        state = q.new_zeros(*q.shape, v.shape[-1], dtype=cd)
    S = state.to(cd)
    if g is not None:
        S = S * g.to(cd).exp()[..., None, None]
    if beta is not None:
        b = beta.to(cd)[..., None]
        # u = b (v - S^T k): the delta rule writes the error of the current prediction.
        vc = b * (vc - torch.einsum("bhkv,bhk->bhv", S, kc))
    S = S + kc[..., :, None] * vc[..., None, :]
    o = torch.einsum("bhkv,bhk->bhv", S, qc) * scale
    return o.to(q.dtype), S


def _sequence_bounds(T: int, cu_seqlens: torch.Tensor | None, batch: int) -> list[tuple[int, int, int]]:
    """(batch index, start, end) of each sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(batch)]
    offsets = cu_seqlens.tolist()
    return [(0, s, e) for s, e in itertools.pairwise(offsets)]


def recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token oracle. q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    cd = compute_dtype(q.dtype)
    out = torch.zeros(B, T, H, V, dtype=q.dtype, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(_sequence_bounds(T, cu_seqlens, B)):
        S = (initial_state[n].to(cd) if initial_state is not None
             else q.new_zeros(H, K, V, dtype=cd))[None]
        for t in range(start, end):
            o, S = step(
                q[b, t][None], k[b, t][None], v[b, t][None],
                None if g is None else g[b, t][None],
                None if beta is None else beta[b, t][None],
                S, scale,
            )
            out[b, t] = o[0]
        finals.append(S[0])
    return out, (torch.stack(finals) if output_final_state else None)


def _to_padded(x: torch.Tensor | None, bounds, length: int) -> torch.Tensor | None:
    """Gather sequences [B, T, ...] into a zero-padded batch [N, length, ...]."""
    if x is None:
        return None
    parts = [F.pad(x[b, s:e], (0, 0) * (x.ndim - 2) + (0, length - (e - s))) for b, s, e in bounds]
    return torch.stack(parts)


def chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel form, O(T C d + T d^2): any T, packed variable lengths.

    Sequences are zero-padded at their end to a multiple of the chunk size. Padding leaves the
    state untouched (k = 0 writes nothing, g = 0 does not decay), so final states are exact.
    """
    B, T, _H, K = q.shape
    C = chunk_size
    cd = compute_dtype(q.dtype)
    scale = resolve_scale(scale, K)
    bounds = _sequence_bounds(T, cu_seqlens, B)
    longest = max(e - s for _, s, e in bounds)
    length = max(C, -(-longest // C) * C)
    if cu_seqlens is None and length == T:
        qs, ks, vs, gs, bs = q, k, v, g, beta
    else:
        qs, ks, vs, gs, bs = (_to_padded(x, bounds, length) for x in (q, k, v, g, beta))
    S0 = None if initial_state is None else initial_state.to(cd)
    o, S = _chunk_core(
        qs.to(cd) * scale, ks.to(cd), vs.to(cd),
        None if gs is None else gs.to(cd), None if bs is None else bs.to(cd), S0, C,
    )
    o = torch.cat([o[n, :e - s] for n, (_, s, e) in enumerate(bounds)])[None] if cu_seqlens is not None else o[:, :T]
    return o.to(q.dtype), (S if output_final_state else None)


def to_blocks(x: torch.Tensor, C: int) -> torch.Tensor:
    """[N, T, H, ...] -> [N, H, n, C, ...] with T = n * C."""
    N, T, H = x.shape[:3]
    x = x.reshape(N, T // C, C, H, *x.shape[3:])
    return x.permute(0, 3, 1, 2, *range(4, x.ndim))


@dataclass
class ChunkFactors:
    """Per-chunk matrices of the recurrence, for all chunks at once ([N, H, n, ...]).

    Within a chunk, with S the state before it and V the chunk's values:
        outputs   = q_eff @ S + attn @ (mix @ V)
        end state = gamma_end * S - k_end^T (w @ S) + k_end^T (mix @ V)
    ``mix`` and ``w`` are the WY / UT-transform factors of the delta rule (None without it).
    Zeroing a row of V removes exactly that token's write and keeps its transition.
    """

    attn: torch.Tensor  # [.., C, C] causal q.k scores with decay, diagonal included
    q_eff: torch.Tensor  # [.., C, K] maps the incoming state to outputs
    k_end: torch.Tensor  # [.., C, K] keys decayed to the chunk end
    gamma_end: torch.Tensor | None  # [.., ] decay across the chunk
    mix: torch.Tensor | None  # [.., C, C] values -> pseudo-values (delta rule)
    w: torch.Tensor | None  # [.., C, K] incoming state -> pseudo-value correction (delta rule)

    def pseudo_values(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.mix is None else self.mix @ v

    def carry(self, S: torch.Tensor, i: int) -> torch.Tensor:
        """The state S at the start of chunk i moved to its end, without chunk i's writes."""
        out = S if self.gamma_end is None else S * self.gamma_end[:, :, i, None, None]
        if self.w is not None:
            out = out - self.k_end[:, :, i].transpose(-1, -2) @ (self.w[:, :, i] @ S)
        return out

    def write(self, u: torch.Tensor, i: int) -> torch.Tensor:
        """What chunk i's pseudo-values u add to the state at its end."""
        return self.k_end[:, :, i].transpose(-1, -2) @ u


def chunk_factors(q, k, g, beta, C: int) -> ChunkFactors:
    """q (pre-scaled), k [N, T, H, K]; g, beta [N, T, H] or None; T a multiple of C."""
    q, k = to_blocks(q, C), to_blocks(k, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if g is not None:
        G = to_blocks(g, C).cumsum(-1)  # log of the decay from the chunk start to each position
        # Mask before exp: above the diagonal G_i - G_j > 0 can overflow.
        decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        gamma = G.exp()[..., None]
        gamma_end = G[..., -1].exp()
        k_end = k * (G[..., -1:] - G).exp()[..., None]
    else:
        decay = causal.to(q.dtype)
        gamma, gamma_end, k_end = None, None, k
    attn = (q @ k.transpose(-1, -2)) * decay
    q_eff = q if gamma is None else q * gamma
    mix = w = None
    if beta is not None:
        # Within a chunk S_r = gamma_r S_0 + sum_{j<=r} (gamma_r/gamma_j) k_j u_j^T, where the
        # pseudo-values u solve a unit lower-triangular system (the WY / UT transform):
        #   (I + tril_strict(diag(b) (K K^T * decay))) U = diag(b) V - diag(b gamma) K S_0.
        b = to_blocks(beta, C)
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        A = eye + (b[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
        mix = torch.linalg.solve_triangular(A, eye * b[..., None, :], upper=False, unitriangular=True)
        w = mix @ (k if gamma is None else gamma * k)
        q_eff = q_eff - attn @ w
    return ChunkFactors(attn, q_eff, k_end, gamma_end, mix, w)


def _chunk_core(q, k, v, g, beta, S0, C):
    """q (pre-scaled), k [N, T, H, K]; v [N, T, H, V]; g, beta [N, T, H]; T a multiple of C."""
    N, T, H, K = q.shape
    V = v.shape[-1]
    f = chunk_factors(q, k, g, beta, C)
    u = f.pseudo_values(to_blocks(v, C))
    S = q.new_zeros(N, H, K, V) if S0 is None else S0
    outs = []
    for i in range(T // C):
        outs.append(f.q_eff[:, :, i] @ S + f.attn[:, :, i] @ u[:, :, i])
        S = f.carry(S, i) + f.write(u[:, :, i], i)
    o = torch.stack(outs, dim=2)  # [N, H, n, C, V]
    return o.permute(0, 2, 3, 1, 4).reshape(N, T, H, V), S
