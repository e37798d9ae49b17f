"""Causal softmax attention with RoPE (torch SDPA), full or sliding-window, with a KV cache state."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import residual_output


@dataclass
class KVCache:
    """Rotated keys and values of the tokens later queries can still see, for B sequences.

    Full attention keeps every token; a window of W keeps the last W - 1 (a query sees itself
    and the W - 1 tokens before it), so the cache of sliding-window attention stays bounded.
    """

    keys: torch.Tensor  # [B, H, S, head_dim]
    values: torch.Tensor  # [B, H, S, head_dim]
    position: int  # tokens consumed so far (all sequences: no padding)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of x [B, H, T, d] by position * theta^(-2i/d)."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d // 2, dtype=torch.float64, device=x.device) * 2 / d)
    angles = positions.to(torch.float64)[:, None] * inv_freq  # float64: exact at large positions
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class AttentionMixer(nn.Module):
    """Multi-head causal attention with RoPE; ``window=W`` limits each query to its last W tokens."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, window: int | None = None,
                 rope_theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"attention head_dim must be even for RoPE, got {head_dim}.")
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive number of tokens or None, got {window}.")
        self.num_heads, self.head_dim, self.window, self.rope_theta = num_heads, head_dim, window, rope_theta
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.o_proj = residual_output(nn.Linear(num_heads * head_dim, hidden_size, bias=False))

    def forward(self, hidden: torch.Tensor, state: KVCache | None = None,
                output_state: bool = True) -> tuple[torch.Tensor, KVCache | None]:
        """hidden [B, T, D] -> (out [B, T, D], cache after the last token, or None if not asked for)."""
        B, T, _ = hidden.shape
        H, d = self.num_heads, self.head_dim
        start = 0 if state is None else state.position
        pos = torch.arange(start, start + T, device=hidden.device)
        q, k, v = (p(hidden).reshape(B, T, H, d).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
        if state is not None:
            k = torch.cat([state.keys.to(k.dtype), k], dim=2)
            v = torch.cat([state.values.to(v.dtype), v], dim=2)
        S = k.shape[2]
        if S == T and (self.window is None or self.window >= T):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            key_pos = torch.arange(start + T - S, start + T, device=hidden.device)
            allowed = key_pos[None, :] <= pos[:, None]
            if self.window is not None:
                allowed &= pos[:, None] - key_pos[None, :] < self.window
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        out = self.o_proj(o.transpose(1, 2).reshape(B, T, H * d))
        if not output_state:
            return out, None
        keep = S if self.window is None else min(S, self.window - 1)
        return out, KVCache(k[:, :, S - keep :], v[:, :, S - keep :], start + T)
