"""Bad input gets a ValueError that names the argument."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs

from hippolm import ops


def test_gated_delta_rule_bad_inputs():
    q, k, v, g, beta = make_inputs("gated_delta_rule", 2, 8, 2, 4, 4)
    cases = [
        ((q[..., :3], k, v, g, beta), {}, "k must have the shape of q"),
        ((q, k, v[:, :5], g, beta), {}, "v must share batch"),
        ((q, k.float(), v, g, beta), {}, "share one dtype"),
        ((q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0]), {}, "T=0"),
        ((q, k, v, g[..., :1], beta), {}, "g must have shape"),
        ((q, k, v, g.masked_fill(g < -0.1, float("nan")), beta), {}, "g contains NaN"),
        ((q, k, v, g, beta.masked_fill(beta > 0.5, float("inf"))), {}, "beta contains NaN"),
        ((q[0], k, v, g, beta), {}, "q must have shape"),
        ((q.long(), k, v, g, beta), {}, "q must be a floating"),
        ((q, k, v, g, beta), {"initial_state": torch.zeros(2, 2, 4, 5)}, "initial_state must have shape"),
        ((q, k, v, g, beta), {"cu_seqlens": torch.tensor([0, 8])}, "batch must be 1"),
        ((q, k, v, g, beta), {"scale": -1.0}, "scale must be"),
        ((q, k, v, g, beta), {"mode": "fast"}, "mode must be"),
        ((q, k, v, g, beta), {"backend": "cuda"}, "backend must be"),
        ((q, k, v, g, beta), {"chunk_size": 0}, "chunk_size"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.gated_delta_rule(*args, **kwargs)


def test_bad_cu_seqlens():
    q, k, v, g = make_inputs("ssd", 1, 8, 1, 4, 4)
    for cu, message in [
        (torch.tensor([0, 5]), "end at T=8"),
        (torch.tensor([0, 6, 3, 8]), "non-decreasing"),
        (torch.tensor([0.0, 8.0]), "int32/int64"),
    ]:
        with pytest.raises(ValueError, match=message):
            ops.ssd(q, k, v, g, cu_seqlens=cu)


def test_step_bad_inputs():
    q, k, v, beta = (x[:, 0] for x in make_inputs("delta_rule", 2, 1, 2, 4, 4))
    with pytest.raises(ValueError, match="state must have shape"):
        ops.delta_rule_step(q, k, v, beta, torch.zeros(2, 2, 4, 3))
    with pytest.raises(ValueError, match="q must have shape"):
        ops.delta_rule_step(q[None], k, v, beta, None)
    with pytest.raises(ValueError, match="beta must have shape"):
        ops.delta_rule_step(q, k, v, beta[:, :1], None)
    with pytest.raises(ValueError, match="beta contains NaN"):
        ops.delta_rule_step(q, k, v, beta.masked_fill(beta > 0.5, float("nan")), None)
    with pytest.raises(ValueError, match="beta must be on cpu"):
        ops.delta_rule_step(q, k, v, beta.to("meta"), None)


def test_gate_checks_name_the_gate_that_is_not_finite():
    """One check for all gates (one device sync on GPU) still names the bad one, whichever it is."""
    q, k, v, g, beta = make_inputs("gated_delta_rule", 1, 8, 2, 4, 4)
    lam = torch.rand(1, 8, 2, ops.num_levels(8), dtype=q.dtype)
    with pytest.raises(ValueError, match="beta contains NaN"):
        ops.loglinear_gated_delta_rule(q, k, v, g, beta.masked_fill(beta > 0.5, float("nan")), lam)
    with pytest.raises(ValueError, match="g contains NaN"):
        ops.loglinear_gated_delta_rule(q, k, v, g.masked_fill(g < -0.1, float("inf")), beta, lam)
