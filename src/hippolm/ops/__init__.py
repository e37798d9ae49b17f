"""Recurrent-memory ops, layout [batch, time, heads, dim].

Each recurrence has a dispatching entry point (``ssd``, ``delta_rule``, ``gated_delta_rule``),
its reference forms (``*_recurrent``: token by token, the oracle; ``*_chunk``: chunkwise
parallel; always plain PyTorch) and a decode step (``*_step``). The log-linear (Fenwick-tree)
variants ``loglinear_ssd`` and ``loglinear_gated_delta_rule`` take per-level weights ``lam``.
"""

from __future__ import annotations

import functools

from .dispatch import (
    delta_rule,
    delta_rule_step,
    gated_delta_rule,
    gated_delta_rule_step,
    ssd,
    ssd_step,
)
from .loglinear import (
    LogLinearState,
    loglinear_gated_delta_rule,
    loglinear_gated_delta_rule_step,
    loglinear_ssd,
    loglinear_ssd_step,
    num_levels,
)


def _reference_form(op, mode: str):
    @functools.wraps(op)
    def form(*args, **kwargs):
        return op(*args, mode=mode, backend="torch", **kwargs)

    form.__name__ = f"{op.__name__}_{mode}"
    form.__qualname__ = form.__name__
    form.__doc__ = f"Plain-PyTorch {mode} form of :func:`{op.__name__}` (same arguments, no mode/backend)."
    return form


ssd_recurrent = _reference_form(ssd, "recurrent")
ssd_chunk = _reference_form(ssd, "chunk")
delta_rule_recurrent = _reference_form(delta_rule, "recurrent")
delta_rule_chunk = _reference_form(delta_rule, "chunk")
gated_delta_rule_recurrent = _reference_form(gated_delta_rule, "recurrent")
gated_delta_rule_chunk = _reference_form(gated_delta_rule, "chunk")

__all__ = [
    "LogLinearState",
    "delta_rule",
    "delta_rule_chunk",
    "delta_rule_recurrent",
    "delta_rule_step",
    "gated_delta_rule",
    "gated_delta_rule_chunk",
    "gated_delta_rule_recurrent",
    "gated_delta_rule_step",
    "loglinear_gated_delta_rule",
    "loglinear_gated_delta_rule_step",
    "loglinear_ssd",
    "loglinear_ssd_step",
    "num_levels",
    "ssd",
    "ssd_chunk",
    "ssd_recurrent",
    "ssd_step",
]
