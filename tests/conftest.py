from __future__ import annotations

import pytest
import torch

# Each recurrence: its gate arguments, in call order.
OP_GATES = {
    "ssd": ("g",),
    "delta_rule": ("beta",),
    "gated_delta_rule": ("g", "beta"),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in the Frobenius norm (robust to entries near zero)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(op: str, B: int, T: int, H: int, K: int, V: int, dtype=torch.float64,
                device="cpu", seed: int = 0):
    """Fresh random inputs in the ranges the layers produce: unit-norm keys, beta in (0, 1),
    log decays in (-1, 0) (some close to 0, i.e. long memory)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = rnd(B, T, H, K)
    k = torch.nn.functional.normalize(rnd(B, T, H, K), dim=-1)
    v = rnd(B, T, H, V)
    gates = {
        "g": torch.nn.functional.logsigmoid(rnd(B, T, H) + 3.0),
        "beta": torch.sigmoid(rnd(B, T, H)),
    }
    args = [q, k, v] + [gates[name] for name in OP_GATES[op]]
    return [x.to(device=device, dtype=dtype) for x in args]


@pytest.fixture(params=list(OP_GATES))
def op_name(request) -> str:
    return request.param
