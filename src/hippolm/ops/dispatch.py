"""The one place that decides which implementation runs an op.

Callers use :func:`ssd`, :func:`delta_rule` and :func:`gated_delta_rule` (and their ``*_step``
forms) and never branch on device: on CPU, or where no fast kernel is right for the inputs,
the plain-PyTorch reference runs; on CUDA a fast kernel runs when one is installed and known
to be correct for the inputs (see :mod:`hippolm.ops.fla_backend`).
"""

from __future__ import annotations

from typing import Literal

import torch

from . import fla_backend, reference, triton_backend
from ._checks import check_sequence_inputs, check_step_inputs
from .decode import recurrent_step

Mode = Literal["chunk", "recurrent"]
Backend = Literal["auto", "torch", "fla", "triton"]


def _run(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    mode: Mode,
    backend: Backend,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_sequence_inputs(q, k, v, {"g": g, "beta": beta}, initial_state, cu_seqlens, scale)
    if mode not in ("chunk", "recurrent"):
        raise ValueError(f"mode must be 'chunk' or 'recurrent', got {mode!r}.")
    if backend not in ("auto", "torch", "fla", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch', 'fla' or 'triton', got {backend!r}.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    tensors = [x for x in (q, k, v, g, beta, initial_state) if x is not None]
    # FLA first where it takes the call (on Hopper with Triton 3.4-3.7.0 with our gated backward
    # kernel); our Triton paths where it does not; the reference last.
    if backend in ("auto", "fla"):
        form, why = fla_backend.plan(op, mode, q, v, tensors)
        if form is not None:
            return fla_backend.run(op, form, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
        if backend == "fla":
            raise ValueError(f"backend='fla' cannot run {op} here: {why}. Use backend='auto'.")
    if backend in ("auto", "triton") and op != "ssd":
        ok, why = triton_backend.plan_delta(op, q, v, tensors, backend)
        if ok:
            return triton_backend.run_delta(q, k, v, g, beta, reference.resolve_scale(scale, q.shape[-1]),
                                            initial_state, output_final_state, cu_seqlens, chunk_size)
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run {op} here: {why}. Use backend='auto'.")
    if backend in ("auto", "triton") and op == "ssd":
        ok, why = triton_backend.plan_linear_ssd(q, v, tensors, initial_state, mode, backend)
        if ok:
            return triton_backend.run_linear_ssd(q, k, v, g, reference.resolve_scale(scale, q.shape[-1]),
                                                 output_final_state, cu_seqlens, chunk_size, initial_state)
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run ssd here: {why}. Use backend='auto'.")
    form = reference.chunk if mode == "chunk" else reference.recurrent
    kwargs = {"chunk_size": chunk_size} if mode == "chunk" else {}
    return form(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, **kwargs)


def ssd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    mode: Mode = "chunk",
    backend: Backend = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-2 / SSD scalar-decay linear attention: S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V].
        g: [B, T, H] log decay per token (log a_t, normally <= 0), not cumulative (FLA's convention).
        scale: multiplies the read-out; None means K ** -0.5 (FLA's default).
        initial_state: [N, H, K, V] state before the first token (N = B, or the number of packed
            sequences with ``cu_seqlens``); None means zeros.
        output_final_state: also return the state after the last token, [N, H, K, V] (fp32, or fp64).
        cu_seqlens: [N + 1] cumulative lengths of sequences packed along time (then B must be 1).
        mode: ``"chunk"`` (chunkwise parallel) or ``"recurrent"`` (token by token); same result.
        backend: ``"auto"`` picks a fast kernel when it is right for the inputs, ``"torch"`` forces
            the reference, ``"fla"`` requires FLA's kernels, ``"triton"`` our own (``ssd``: the
            log-linear kernels with every level weighted 1; (gated) delta rule: torch chunk form with a
            Triton state scan). ``"auto"`` uses them for training on CUDA where FLA is missing, and for
            float32 Gated DeltaNet training (FLA's chunk kernels compute in TF32). Where FLA refuses
            its gated backward (Hopper with Triton 3.4-3.7.0), ``"auto"`` and ``"fla"`` run FLA's
            kernels with our replacement of the refused one (:mod:`hippolm.ops.fla_gated`).
    Returns:
        (o [B, T, H, V] in q's dtype, final state or None).
    """
    return _run("ssd", q, k, v, g, None, scale, initial_state, output_final_state, cu_seqlens,
                mode, backend, chunk_size)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    mode: Mode = "chunk",
    backend: Backend = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeltaNet: S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = scale S_t^T q_t.

    ``beta`` [B, T, H] is the write strength b_t (normally in (0, 1), e.g. a sigmoid); keys are
    used as given (L2-normalise them for a stable delta rule). Other arguments as :func:`ssd`.
    """
    return _run("delta_rule", q, k, v, None, beta, scale, initial_state, output_final_state,
                cu_seqlens, mode, backend, chunk_size)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    mode: Mode = "chunk",
    backend: Backend = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet: S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = scale S_t^T q_t.

    ``g`` [B, T, H] log decay as in :func:`ssd`; ``beta`` [B, T, H] as in :func:`delta_rule`.
    """
    return _run("gated_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state,
                cu_seqlens, mode, backend, chunk_size)


def _step(op, q, k, v, g, beta, state, scale):
    check_step_inputs(q, k, v, {"g": g, "beta": beta}, state)
    return recurrent_step(q, k, v, g, beta, state, scale)  # one kernel on CUDA


def ssd_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
    state: torch.Tensor | None, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of :func:`ssd`: q, k [B, H, K], v [B, H, V], g [B, H], state [B, H, K, V] or None.

    Returns (o [B, H, V], new state).
    """
    return _step("ssd", q, k, v, g, None, state, scale)


def delta_rule_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor | None, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of :func:`delta_rule` (shapes as :func:`ssd_step`)."""
    return _step("delta_rule", q, k, v, None, beta, state, scale)


def gated_delta_rule_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor | None, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of :func:`gated_delta_rule` (shapes as :func:`ssd_step`)."""
    return _step("gated_delta_rule", q, k, v, g, beta, state, scale)
