"""FLA (flash-linear-attention, optional ``[cuda]`` extra) kernels behind the dispatch.

:func:`unsupported_reason` says why FLA must not run a call (None when it may); the dispatch
then falls back to the reference. FLA is imported lazily so CPU installs never need it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

_FLA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GATED_OPS = ("ssd", "gated_delta_rule")


@functools.cache
def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


@functools.cache
def _gated_backward_refused(device_index: int) -> bool:
    """FLA 0.6.0 refuses the backward of its gated chunk kernels on Hopper with Triton in
    [3.4, 3.7.1) because they give wrong results there; we must not call it then."""
    import triton

    major, _minor = torch.cuda.get_device_capability(device_index)
    version = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:3] if p.isdigit())
    return major == 9 and (3, 4, 0) <= version < (3, 7, 1)


def unsupported_reason(op: str, q: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor]) -> str | None:
    if not q.is_cuda:
        return "inputs are not on a CUDA device"
    if not fla_available():
        return "FLA is not installed (pip install 'hippolm[cuda]')"
    if q.dtype not in _FLA_DTYPES:
        return f"FLA kernels do not take {q.dtype}"
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        return "FLA kernels take head dims up to 256"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_grad and op in _GATED_OPS and _gated_backward_refused(q.device.index or 0):
        return "FLA's gated backward is incorrect on Hopper with this Triton version"
    return None


def run(op, mode, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    if initial_state is not None:
        kwargs["initial_state"] = initial_state.float()
    if op == "ssd":
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

        fn = chunk_simple_gla if mode == "chunk" else fused_recurrent_simple_gla
        return fn(q, k, v, g=g, **kwargs)
    if op == "delta_rule":
        from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule

        fn = chunk_delta_rule if mode == "chunk" else fused_recurrent_delta_rule
        return fn(q, k, v, beta=beta, **kwargs)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    fn = chunk_gated_delta_rule if mode == "chunk" else fused_recurrent_gated_delta_rule
    return fn(q, k, v, g=g, beta=beta, **kwargs)
