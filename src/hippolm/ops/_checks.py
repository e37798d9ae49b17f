"""Input validation shared by every op: errors name the argument and say what was expected."""

from __future__ import annotations

import itertools

import torch

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def check_finite(gates: dict[str, torch.Tensor | None]) -> None:
    """Every gate finite. On GPU this costs a device sync, so one for all the gates of a call (not
    one per gate); skipped while a CUDA graph is being captured, where a sync is illegal."""
    named = [(name, g) for name, g in gates.items() if g is not None]
    if not named or (named[0][1].is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    finite = torch.stack([torch.isfinite(g).all() for _, g in named]).tolist()
    for (name, _), ok in zip(named, finite, strict=True):
        if not ok:
            _fail(f"{name} contains NaN or infinite values; gates and level weights must be finite (log-space "
                  "decays <= 0).")


def check_sequence_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: dict[str, torch.Tensor | None],
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float | None,
    finite: bool = True,
) -> int:
    """Validate [B, T, H, D] inputs of a sequence op; return the number of sequences N. ``finite``
    False: the caller checks the gates' values itself (with more tensors, in one device sync)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
        if x.ndim != 4:
            _fail(f"{name} must have shape [batch, time, heads, dim], got {tuple(x.shape)}.")
        if x.dtype not in _FLOAT_TYPES:
            _fail(f"{name} must be a floating tensor (fp16, bf16, fp32 or fp64), got {x.dtype}.")
    if k.shape != q.shape:
        _fail(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}.")
    if v.shape[:3] != q.shape[:3]:
        _fail(f"v must share batch, time and heads with q {tuple(q.shape[:3])}, got {tuple(v.shape[:3])}.")
    if not (q.dtype == k.dtype == v.dtype):
        _fail(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        _fail(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}.")
    B, T, H, K = q.shape
    if T == 0:
        _fail("q, k and v have zero time steps (T=0); pass at least one token.")
    for name, g in gates.items():
        if g is None:
            continue
        if not isinstance(g, torch.Tensor) or g.shape != (B, T, H):
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            _fail(f"{name} must have shape [batch, time, heads] = {(B, T, H)}, got {shape}.")
        if g.dtype not in _FLOAT_TYPES:
            _fail(f"{name} must be a floating tensor, got {g.dtype}.")
        if g.device != q.device:
            _fail(f"{name} must be on {q.device}, got {g.device}.")
    if finite:
        check_finite(gates)
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        _fail(f"scale must be a positive number or None (meaning 1/sqrt(head_dim)), got {scale!r}.")
    n = B
    if cu_seqlens is not None:
        if B != 1:
            _fail(f"with cu_seqlens the sequences are packed along time, so batch must be 1, got {B}.")
        if cu_seqlens.ndim != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            _fail("cu_seqlens must be a 1-D int32/int64 tensor of cumulative lengths [0, l1, l1+l2, ...].")
        if cu_seqlens.numel() < 2:
            _fail("cu_seqlens must hold at least two offsets [0, T].")
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != T:
            _fail(f"cu_seqlens must start at 0 and end at T={T}, got {offsets[0]} .. {offsets[-1]}.")
        if any(b < a for a, b in itertools.pairwise(offsets)):
            _fail("cu_seqlens must be non-decreasing.")
        n = len(offsets) - 1
    if initial_state is not None:
        want = (n, H, K, v.shape[-1])
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            shape = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else initial_state
            _fail(f"initial_state must have shape [sequences, heads, k_dim, v_dim] = {want}, got {shape}.")
        if initial_state.device != q.device:
            _fail(f"initial_state must be on {q.device}, got {initial_state.device}.")
    return n


def check_step_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: dict[str, torch.Tensor | None],
    state: torch.Tensor | None,
) -> None:
    """Validate [B, H, D] inputs of a single decode step."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            _fail(f"{name} must have shape [batch, heads, dim] for a decode step, got {shape}.")
        if x.dtype not in _FLOAT_TYPES:
            _fail(f"{name} must be a floating tensor, got {x.dtype}.")
    if k.shape != q.shape:
        _fail(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}.")
    if v.shape[:2] != q.shape[:2]:
        _fail(f"v must share batch and heads with q {tuple(q.shape[:2])}, got {tuple(v.shape[:2])}.")
    if not (q.dtype == k.dtype == v.dtype):
        _fail(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    B, H, K = q.shape
    for name, g in gates.items():
        if g is None:
            continue
        if not isinstance(g, torch.Tensor) or g.shape != (B, H):
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            _fail(f"{name} must have shape [batch, heads] = {(B, H)}, got {shape}.")
        if g.device != q.device:
            _fail(f"{name} must be on {q.device}, got {g.device}.")
    check_finite(gates)
    if state is not None and tuple(state.shape) != (B, H, K, v.shape[-1]):
        _fail(f"state must have shape [batch, heads, k_dim, v_dim] = {(B, H, K, v.shape[-1])}, "
              f"got {tuple(state.shape)}.")
