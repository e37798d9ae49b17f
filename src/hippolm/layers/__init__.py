"""Token mixers with explicit state: ``forward(hidden [B, T, D], state=None) -> (out, new_state)``.

States are small dataclasses passed in and out (never stored on modules): :class:`KVCache` for
attention, :class:`RecurrentState` (short-convolution inputs + recurrent memory) for the others.
A prompt can be fed in pieces of any length, or token by token, with the same result as one pass.
:func:`build_mixer` is the one registry that maps a mixer name to its module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .attention import AttentionMixer, KVCache
from .common import A_INIT_RANGE, GatedRMSNorm, LevelWeights, RMSNorm, ShortConv, map_state
from .recurrent import GatedDeltaNetMixer, Mamba2Mixer, RecurrentMixer, RecurrentState


@dataclass(frozen=True)
class MixerArgs:
    """Sizes every mixer is built from (each uses the ones it needs)."""

    hidden_size: int
    num_heads: int
    head_dim: int
    state_size: int | None = None  # Mamba-2 key (state) dim per head; None: head_dim
    expand_v: int = 1  # value dim = head_dim * expand_v (Mamba-2 and Gated DeltaNet)
    conv_size: int = 4
    window: int | None = None  # sliding-window attention span (tokens, the query included)
    max_position: int = 2048  # longest sequence; sets the log-linear levels
    A_init_range: tuple[float, float] = A_INIT_RANGE  # recurrent mixers' decay rates A ~ U(lo, hi)
    rope_theta: float = 10000.0
    eps: float = 1e-5


def _attention(a: MixerArgs, window: int | None) -> nn.Module:
    return AttentionMixer(a.hidden_size, a.num_heads, a.head_dim, window=window, rope_theta=a.rope_theta)


def _swa(a: MixerArgs) -> nn.Module:
    if a.window is None:
        raise ValueError("mixer 'swa' needs a window (number of tokens each query attends to).")
    return _attention(a, a.window)


def _mamba2(a: MixerArgs, loglinear: bool) -> nn.Module:
    return Mamba2Mixer(a.hidden_size, a.num_heads, a.head_dim * a.expand_v, a.state_size or a.head_dim,
                       a.conv_size, loglinear=loglinear, max_position=a.max_position, eps=a.eps,
                       A_init_range=a.A_init_range)


def _gdn(a: MixerArgs, loglinear: bool) -> nn.Module:
    return GatedDeltaNetMixer(a.hidden_size, a.num_heads, a.head_dim, a.expand_v, a.conv_size,
                              loglinear=loglinear, max_position=a.max_position, eps=a.eps,
                              A_init_range=a.A_init_range)


MIXERS: dict[str, Callable[[MixerArgs], nn.Module]] = {
    "attention": lambda a: _attention(a, None),
    "swa": _swa,
    "mamba2": lambda a: _mamba2(a, False),
    "gdn": lambda a: _gdn(a, False),
    "loglinear_mamba2": lambda a: _mamba2(a, True),
    "loglinear_gdn": lambda a: _gdn(a, True),
}
MIXER_TYPES = tuple(MIXERS)


def build_mixer(kind: str, args: MixerArgs) -> nn.Module:
    """The mixer module called ``kind`` (one of :data:`MIXER_TYPES`)."""
    if kind not in MIXERS:
        raise ValueError(f"unknown mixer {kind!r}; choose one of {', '.join(MIXER_TYPES)}.")
    return MIXERS[kind](args)


__all__ = [
    "MIXERS",
    "MIXER_TYPES",
    "AttentionMixer",
    "GatedDeltaNetMixer",
    "GatedRMSNorm",
    "KVCache",
    "LevelWeights",
    "Mamba2Mixer",
    "MixerArgs",
    "RMSNorm",
    "RecurrentMixer",
    "RecurrentState",
    "ShortConv",
    "build_mixer",
    "map_state",
]
