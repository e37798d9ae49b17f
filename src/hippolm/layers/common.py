"""Building blocks shared by the token mixers: norms, the short causal convolution, gate init.

Special parameters (decay rates, convolution taps, level weights) are set by each module's
``reset_special_parameters``. It runs at construction and again from
``HippoPreTrainedModel._init_weights`` (after transformers' generic init of the submodules), and
skips every tensor transformers marked as loaded from a checkpoint (``_is_hf_initialized``), so
``from_pretrained`` never overwrites trained weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def set_param_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``param`` unless a checkpoint already loaded it."""
    if not getattr(param, "_is_hf_initialized", False):
        with torch.no_grad():
            param.copy_(value.to(dtype=param.dtype, device=param.device))


def no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Mark a parameter that optimisers should not decay (gates, level scales)."""
    param._no_weight_decay = True
    return param


def residual_output(linear: nn.Linear) -> nn.Linear:
    """Mark the projection that writes a block's branch into the residual stream (attention's and
    the recurrent mixers' output projection, the MLP's down projection). The standalone model
    starts these small (see ``HippoPreTrainedModel._init_weights``)."""
    linear._residual_output = True
    return linear


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for gates and norms: float32 for half inputs, float64 kept (exact tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def map_state(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a (nested) dataclass state, e.g. to reorder the batch."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.replace(state, **{f.name: map_state(getattr(state, f.name), fn)
                                             for f in dataclasses.fields(state)})
    return state


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(acc_dtype(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm with a SiLU gate, on [..., heads, dim].

    ``norm_before_gate=True``: norm(x) * silu(z) (Gated DeltaNet); False: norm(x * silu(z)) (Mamba-2).
    """

    def __init__(self, heads: int, dim: int, eps: float = 1e-5, norm_before_gate: bool = True):
        super().__init__()
        self.eps, self.norm_before_gate = eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cd = acc_dtype(x.dtype)
        xf, gate = x.to(cd), F.silu(z.to(cd))
        if not self.norm_before_gate:
            xf = xf * gate
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(cd)
        if self.norm_before_gate:
            xf = xf * gate
        return xf.to(x.dtype)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time followed by SiLU, with a decode state.

    The state is the last ``kernel_size - 1`` inputs [B, C, K-1] (zeros before the first token),
    so a sequence cut anywhere and continued gives the same output as one pass.

    Taps and the optional bias start as PyTorch's depthwise Conv1d default,
    U(-1/sqrt(K), 1/sqrt(K)). Gated DeltaNet's convolutions have no bias (as FLA's), Mamba-2's
    have one (as mamba_ssm's).
    """

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = True):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"conv kernel_size must be >= 1, got {kernel_size}.")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        bound = 1 / math.sqrt(self.kernel_size)  # PyTorch's default for a depthwise Conv1d (fan_in = K)
        set_param_(self.weight, torch.empty_like(self.weight, device="cpu").uniform_(-bound, bound))
        if self.bias is not None:
            set_param_(self.bias, torch.empty_like(self.bias, device="cpu").uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C], state [B, C, K-1] or None -> (y [B, T, C], new state)."""
        B, _T, C = x.shape
        K = self.kernel_size
        xt = x.transpose(1, 2)
        if state is None:
            state = xt.new_zeros(B, C, K - 1)
        full = torch.cat([state.to(xt.dtype), xt], dim=-1)  # [B, C, K-1+T]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.conv1d(full, self.weight.to(x.dtype)[:, None, :], bias, groups=C)
        return F.silu(y).transpose(1, 2), full[..., full.shape[-1] - (K - 1):]


A_INIT_RANGE = (1.0, 16.0)  # Mamba-2's (mamba_ssm's A_init_range)


def check_A_init_range(A_init_range) -> tuple[float, float]:
    """(lo, hi) with 0 < lo <= hi, or a clear error."""
    try:
        lo, hi = (float(x) for x in A_init_range)
    except (TypeError, ValueError):
        raise ValueError(f"A_init_range must be two numbers (lo, hi), got {A_init_range!r}.") from None
    if not 0 < lo <= hi:
        raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {A_init_range!r}.")
    return lo, hi


def decay_init(heads: int, A_init_range=A_INIT_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's initialisation: A ~ U(A_init_range) (default U(1, 16); returned as log A) and dt
    log-uniform in [1e-3, 0.1], returned as ``dt_bias = softplus^-1(dt)`` so that
    softplus(0 + dt_bias) = dt. The decay per token starts at exp(-A dt): a small A keeps memories
    longer (with one head, U(1, 16) may draw a fast-forgetting A that MQAR cannot train out of)."""
    lo, hi = check_A_init_range(A_init_range)
    A_log = torch.empty(heads).uniform_(lo, hi).log()
    dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(0.1))).clamp_min(1e-4)
    return A_log, dt + torch.log(-torch.expm1(-dt))


def log_decay(A_log: torch.Tensor, dt_raw: torch.Tensor, dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g = -exp(A_log) * dt, dt) with dt = softplus(dt_raw + dt_bias), in the accumulation dtype."""
    cd = acc_dtype(dt_raw.dtype)
    dt = F.softplus(dt_raw.to(cd) + dt_bias.to(cd))
    return -A_log.to(cd).exp() * dt, dt


class LevelWeights(nn.Module):
    """Log-linear level weights ``lam = softplus(Lscale[h, l] * (W x)[h, l])``, [B, T, H, L].

    W starts at zero, so every level gets softplus(0) and a new log-linear layer computes its
    linear counterpart (scaled by ln 2): training starts from the linear model.
    """

    def __init__(self, hidden_size: int, heads: int, levels: int):
        super().__init__()
        self.heads, self.levels = heads, levels
        self.proj = nn.Linear(hidden_size, heads * levels, bias=False)
        self.scale = no_weight_decay(nn.Parameter(torch.ones(heads, levels)))
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        set_param_(self.proj.weight, torch.zeros_like(self.proj.weight, device="cpu"))
        set_param_(self.scale, torch.ones_like(self.scale, device="cpu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.proj(x).unflatten(-1, (self.heads, self.levels))
        cd = acc_dtype(x.dtype)
        return F.softplus(self.scale.to(cd) * raw.to(cd))
