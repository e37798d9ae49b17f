"""Recurrent token mixers: Mamba-2 and Gated DeltaNet, each linear or log-linear (Fenwick tree).

Both share one pipeline (:class:`RecurrentMixer`): projections -> short causal convolution ->
recurrence (``hippolm.ops``: the chunkwise op for sequences, the step op for single tokens) ->
gated per-head RMSNorm -> output projection. State lives in a :class:`RecurrentState` passed in
and out of ``forward``, never on the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .common import (
    A_INIT_RANGE,
    GatedRMSNorm,
    LevelWeights,
    ShortConv,
    check_A_init_range,
    decay_init,
    log_decay,
    no_weight_decay,
    residual_output,
    set_param_,
)

Memory = torch.Tensor | ops.LogLinearState


@dataclass
class RecurrentState:
    """Decode state of a recurrent mixer for B sequences."""

    conv: torch.Tensor  # [B, conv channels, kernel_size - 1]: last inputs of the short convolution
    memory: Memory  # [B, H, K, V], or the log-linear level states


# (base kind, log-linear) -> (sequence op, decode step op)
_OPS = {
    ("mamba2", False): (ops.ssd, ops.ssd_step),
    ("mamba2", True): (ops.loglinear_ssd, ops.loglinear_ssd_step),
    ("gdn", False): (ops.gated_delta_rule, ops.gated_delta_rule_step),
    ("gdn", True): (ops.loglinear_gated_delta_rule, ops.loglinear_gated_delta_rule_step),
}


def _chunk_kwargs(x: torch.Tensor) -> dict:
    """On CPU, a sequence shorter than the ops' 64-token chunk runs in one chunk of the next power of
    two (>= 16) instead of being padded to 64: same result, 1.5-2x faster at T = 32. GPUs keep 64
    (the kernels' size)."""
    T = x.shape[1]
    if x.device.type != "cpu" or T >= 64:
        return {}
    return {"chunk_size": max(16, 1 << (T - 1).bit_length())}


def _loglinear_folded(seq_op, q, k, v, gates, scale, memory: ops.LogLinearState | None, output_state: bool):
    """Run a log-linear sequence op with the batch folded into the heads: [B, T, H] -> [1, T, B*H].

    Exact (sequences and heads are independent, and a mixer's sequences are all at one position),
    and 5x faster on CPU at B=128 because the op's chunk form places each sequence separately
    (a Python loop whose backward is quadratic in B). Falls back to the plain call otherwise.
    """
    B, T, H = q.shape[:3]
    if B == 1 or (memory is not None and bool((memory.position != memory.position[0]).any())):
        return seq_op(q, k, v, *gates, scale=scale, initial_state=memory, output_final_state=output_state,
                      **_chunk_kwargs(q))

    def fold(x):
        return x.transpose(0, 1).reshape(1, T, B * H, *x.shape[3:])

    init = None if memory is None else ops.LogLinearState(memory.slots.flatten(0, 1)[None], memory.position[:1])
    o, final = seq_op(*(fold(x) for x in (q, k, v, *gates)), scale=scale, initial_state=init,
                      output_final_state=output_state, **_chunk_kwargs(q))
    o = o[0].reshape(T, B, H, -1).transpose(0, 1)
    if final is not None:
        final = ops.LogLinearState(final.slots[0].unflatten(0, (B, H)), final.position.expand(B).clone())
    return o, final


class RecurrentMixer(nn.Module):
    """Shared pipeline; subclasses define the projections (``_inputs``, ``_qkv``, ``_output``)."""

    kind: str  # "mamba2" or "gdn"
    scale: float | None = None  # read-out scale passed to the op (None: 1/sqrt(k_dim))
    conv_bias: bool = True  # the short convolution has a bias (Mamba-2, as mamba_ssm)

    def __init__(self, hidden_size: int, num_heads: int, conv_channels: int, conv_size: int, loglinear: bool,
                 max_position: int, A_init_range: tuple[float, float] = A_INIT_RANGE):
        super().__init__()
        self.A_init_range = check_A_init_range(A_init_range)
        self.hidden_size, self.num_heads, self.loglinear = hidden_size, num_heads, loglinear
        self.max_position = max_position
        self.conv = ShortConv(conv_channels, conv_size, bias=self.conv_bias)
        self.A_log = no_weight_decay(nn.Parameter(torch.empty(num_heads)))
        self.dt_bias = no_weight_decay(nn.Parameter(torch.empty(num_heads)))
        # L = ceil(log2 max_position) + 1 levels cover positions 0 .. max_position - 1; the op
        # raises (never truncates) if a sequence goes further.
        self.num_levels = ops.num_levels(max_position) if loglinear else 0
        self.levels = LevelWeights(hidden_size, num_heads, self.num_levels) if loglinear else None

    def reset_special_parameters(self) -> None:
        A_log, dt_bias = decay_init(self.num_heads, self.A_init_range)
        set_param_(self.A_log, A_log)
        set_param_(self.dt_bias, dt_bias)

    # --- subclass hooks -------------------------------------------------------------------------
    def _inputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(convolution input [B, T, C], projections that bypass the convolution)."""
        raise NotImplementedError

    def _qkv(self, conv_out: torch.Tensor, extra: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(q, k, v [B, T, H, *], g [B, T, H] log decay, beta [B, T, H] or None)."""
        raise NotImplementedError

    def _output(self, o: torch.Tensor, conv_out: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # --- the pipeline ---------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, state: RecurrentState | None = None,
                output_state: bool = True) -> tuple[torch.Tensor, RecurrentState | None]:
        """hidden [B, T, D] -> (out [B, T, D], state after the last token, or None if not asked for)."""
        conv_in, extra = self._inputs(hidden)
        conv_out, conv_state = self.conv(conv_in, None if state is None else state.conv)
        q, k, v, g, beta = self._qkv(conv_out, extra)
        gates = [g] + ([] if beta is None else [beta]) + ([self.levels(hidden)] if self.loglinear else [])
        seq_op, step_op = _OPS[(self.kind, self.loglinear)]
        memory = None if state is None else state.memory
        if hidden.shape[1] == 1 and (output_state or memory is not None):
            # One token (decoding): the O(1) / O(log T) step op instead of a chunk padded to 64.
            o, memory = step_op(q[:, 0], k[:, 0], v[:, 0], *(x[:, 0] for x in gates), memory, scale=self.scale)
            o = o[:, None]
        elif self.loglinear:
            o, memory = _loglinear_folded(seq_op, q, k, v, gates, self.scale, memory, output_state)
        else:
            o, memory = seq_op(q, k, v, *gates, scale=self.scale, initial_state=memory,
                               output_final_state=output_state, **_chunk_kwargs(q))
        out = self._output(o.to(hidden.dtype), conv_out, extra)
        return out, (RecurrentState(conv_state, memory) if output_state else None)


class Mamba2Mixer(RecurrentMixer):
    """Mamba-2 (SSD) mixer, optionally log-linear.

    One in-projection gives z (output gate), x (values), B (keys), C (queries) and dt per head.
    B and C form one group shared by all heads (Mamba-2's ngroups=1). dt is folded into the
    keys (k = dt * B), the decay is g = -exp(A_log) * dt, the read-out is unscaled (y = C^T h),
    plus the skip D * x; then RMSNorm(y * silu(z)) per head and the out-projection.
    Per head: key dim ``state_size`` (N), value dim ``head_dim`` (P); state [B, H, N, P].
    """

    kind = "mamba2"
    scale = 1.0

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, state_size: int, conv_size: int = 4,
                 loglinear: bool = False, max_position: int = 2048, eps: float = 1e-5,
                 A_init_range: tuple[float, float] = A_INIT_RANGE):
        inner = num_heads * head_dim
        super().__init__(hidden_size, num_heads, inner + 2 * state_size, conv_size, loglinear, max_position,
                         A_init_range)
        self.head_dim, self.state_size = head_dim, state_size
        self.in_proj = nn.Linear(hidden_size, 2 * inner + 2 * state_size + num_heads, bias=False)
        self.D = no_weight_decay(nn.Parameter(torch.ones(num_heads)))
        self.norm = GatedRMSNorm(num_heads, head_dim, eps, norm_before_gate=False)
        self.out_proj = residual_output(nn.Linear(inner, hidden_size, bias=False))
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        super().reset_special_parameters()
        set_param_(self.D, torch.ones(self.num_heads))

    def _inputs(self, hidden):
        inner, N, H = self.num_heads * self.head_dim, self.state_size, self.num_heads
        z, xbc, dt_raw = self.in_proj(hidden).split([inner, inner + 2 * N, H], dim=-1)
        return xbc, {"z": z, "dt_raw": dt_raw}

    def _qkv(self, conv_out, extra):
        B, T, _ = conv_out.shape
        H, P, N = self.num_heads, self.head_dim, self.state_size
        x, b, c = conv_out.split([H * P, N, N], dim=-1)
        g, dt = log_decay(self.A_log, extra["dt_raw"], self.dt_bias)
        k = (b[:, :, None, :] * dt[..., None]).to(conv_out.dtype)  # dt folded into the keys
        q = c[:, :, None, :].expand(B, T, H, N).contiguous()  # kernels want dense inputs
        return q, k, x.reshape(B, T, H, P), g, None

    def _output(self, o, conv_out, extra):
        B, T, H, P = o.shape
        x = conv_out[..., : H * P].reshape(B, T, H, P)
        y = o + self.D.to(o.dtype)[:, None] * x
        y = self.norm(y, extra["z"].reshape(B, T, H, P))
        return self.out_proj(y.reshape(B, T, H * P))


class GatedDeltaNetMixer(RecurrentMixer):
    """Gated DeltaNet mixer, optionally log-linear.

    q, k, v projections share one short convolution (depthwise, so it is one convolution per
    channel of each), SiLU, L2-normalised q and k; beta = sigmoid(b_proj(x)); decay
    g = -exp(A_log) * softplus(a_proj(x) + dt_bias); read-out scaled by 1/sqrt(head_dim); then
    RMSNorm(o) * silu(g_proj(x)) per head and o_proj. Per head: key dim ``head_dim``, value dim
    ``head_dim * expand_v``; state [B, H, K, V].
    """

    kind = "gdn"
    conv_bias = False  # as FLA's GatedDeltaNet

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, expand_v: int = 1, conv_size: int = 4,
                 loglinear: bool = False, max_position: int = 2048, eps: float = 1e-5,
                 A_init_range: tuple[float, float] = A_INIT_RANGE):
        K, V = head_dim, head_dim * expand_v
        super().__init__(hidden_size, num_heads, num_heads * (2 * K + V), conv_size, loglinear, max_position,
                         A_init_range)
        self.head_k_dim, self.head_v_dim = K, V
        self.q_proj = nn.Linear(hidden_size, num_heads * K, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * K, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * V, bias=False)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.g_proj = nn.Linear(hidden_size, num_heads * V, bias=False)
        self.norm = GatedRMSNorm(num_heads, V, eps, norm_before_gate=True)
        self.o_proj = residual_output(nn.Linear(num_heads * V, hidden_size, bias=False))
        self.reset_special_parameters()

    def _inputs(self, hidden):
        qkv = torch.cat([self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)], dim=-1)
        return qkv, {"a": self.a_proj(hidden), "b": self.b_proj(hidden), "gate": self.g_proj(hidden)}

    def _qkv(self, conv_out, extra):
        B, T, _ = conv_out.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q, k, v = conv_out.split([H * K, H * K, H * V], dim=-1)
        q = F.normalize(q.reshape(B, T, H, K), dim=-1)
        k = F.normalize(k.reshape(B, T, H, K), dim=-1)
        g, _ = log_decay(self.A_log, extra["a"], self.dt_bias)
        beta = torch.sigmoid(extra["b"].to(g.dtype))
        return q, k, v.reshape(B, T, H, V), g, beta

    def _output(self, o, conv_out, extra):
        B, T, H, V = o.shape
        y = self.norm(o, extra["gate"].reshape(B, T, H, V))
        return self.o_proj(y.reshape(B, T, H * V))
