"""FLA (flash-linear-attention 0.6.0, optional ``[cuda]`` extra) kernels behind the dispatch.

:func:`plan` returns the FLA kernel to run a call with, or the reason none is right for it (the
dispatch then runs the reference). What FLA 0.6.0 gets wrong or refuses, and how we route:

- gated chunk backward (``chunk_simple_gla`` with ``g``, ``chunk_gated_delta_rule``) on Hopper
  with Triton in [3.4, 3.7.1) raises in one kernel (FLA: "produces incorrect results"): there we
  run FLA's other kernels with our own in its place (form ``"chunk_patched"``,
  :mod:`hippolm.ops.fla_gated`);
- float32: the chunk kernels multiply in TF32 (relative error ~1.5e-3 against float64 measured
  on H100) and ``chunk_delta_rule`` rejects it, so float32 runs the fused recurrent kernels,
  which compute in full float32 (~1e-6);
- ``fused_recurrent_gated_delta_rule`` has no backward: use the chunk kernel when gradients flow;
- no float64, head dims up to 256, even head dims for 16-bit backward.
FLA is imported lazily so CPU installs never need it.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch

_FLA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


@functools.cache
def gated_chunk_backward_broken(device_index: int) -> bool:
    """FLA 0.6.0's own guard: Hopper (sm_90) with Triton >= 3.4 and < 3.7.1."""
    import triton

    major, _ = torch.cuda.get_device_capability(device_index)
    parts = [int(p) for p in triton.__version__.split("+")[0].split(".")[:3] if p.isdigit()]
    return major == 9 and (3, 4, 0) <= tuple(parts) < (3, 7, 1)


def _kernel(op: str, form: str) -> Callable:
    if op == "ssd":
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

        return chunk_simple_gla if form == "chunk" else fused_recurrent_simple_gla
    if op == "delta_rule":
        from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule

        return chunk_delta_rule if form == "chunk" else fused_recurrent_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    return chunk_gated_delta_rule if form == "chunk" else fused_recurrent_gated_delta_rule


def plan(op: str, mode: str, q: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor]) -> tuple[str | None, str]:
    """Return (FLA form to use: "chunk" | "chunk_patched" | "recurrent" | None, reason)."""
    if not q.is_cuda:
        return None, "inputs are not on a CUDA device"
    if not fla_available():
        return None, "FLA is not installed (pip install 'hippolm[cuda]')"
    if q.dtype not in _FLA_DTYPES:
        return None, f"FLA kernels do not take {q.dtype}"
    K, V = q.shape[-1], v.shape[-1]
    if K > 256 or V > 256:
        return None, "FLA kernels take head dims up to 256"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_grad and q.element_size() == 2 and (K % 2 or V % 2):
        return None, "FLA's 16-bit backward needs even head dims"
    form = "recurrent" if q.dtype == torch.float32 else mode  # chunk kernels are TF32 inside
    if op == "gated_delta_rule" and needs_grad:
        if q.dtype == torch.float32:
            return None, "FLA has no full-float32 Gated DeltaNet kernel with a backward"
        form = "chunk"  # the fused recurrent kernel has no backward
    if needs_grad and form == "chunk" and op != "delta_rule" and gated_chunk_backward_broken(q.device.index or 0):
        # FLA refuses one kernel of this backward here; ours (hippolm.ops.fla_gated) replaces it.
        return "chunk_patched", "fla, with our dq/dk/dg kernel in its gated chunk backward"
    return form, "fla"


def run(op, form, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    if form == "chunk_patched":
        from . import fla_gated
        from .reference import resolve_scale

        scale = resolve_scale(scale, q.shape[-1])
        if op == "ssd":
            return fla_gated.simple_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
        return fla_gated.gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    kwargs = dict(scale=scale, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                  initial_state=None if initial_state is None else initial_state.float())
    fn = _kernel(op, form)
    if op == "ssd":
        return fn(q, k, v, g=g, **kwargs)
    if op == "delta_rule":
        return fn(q, k, v, beta=beta, **kwargs)
    return fn(q, k, v, g=g, beta=beta, **kwargs)
