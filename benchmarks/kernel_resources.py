"""Registers, spills and shared memory of every Triton kernel one training step of an op compiles,
at the shape of benchmarks/kernel_bench.py (bf16, H=16, d=128): where a kernel spills registers to
local memory, its time is not what its bytes and FLOPs predict.

    python benchmarks/kernel_resources.py --ops loglinear_ssd,loglinear_gated_delta_rule --json $OUT/res.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json

import torch
import triton
from triton.runtime.jit import JITFunction

from hippolm import ops


def step(op: str, B: int, T: int, H: int, d: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def r(*s):
        return torch.randn(*s, device="cuda", generator=gen).bfloat16().requires_grad_()

    q, v = r(B, T, H, d), r(B, T, H, d)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, d, device="cuda", generator=gen), dim=-1).bfloat16()
    k.requires_grad_()
    g = (-torch.rand(B, T, H, device="cuda", generator=gen) * 0.1).requires_grad_()
    lam = torch.rand(B, T, H, ops.num_levels(T), device="cuda", generator=gen).requires_grad_()
    if op == "loglinear_ssd":
        o, _ = ops.loglinear_ssd(q, k, v, g, lam, backend="triton")
    else:
        beta = torch.rand(B, T, H, device="cuda", generator=gen).requires_grad_()
        o, _ = ops.loglinear_gated_delta_rule(q, k, v, g, beta, lam, backend="triton")
    torch.autograd.grad(o, (q, k, v, g, lam), torch.randn_like(o))
    torch.cuda.synchronize()


def compiled_kernels() -> list[dict]:
    """Every compiled kernel of every @triton.jit function in the modules our ops have imported."""
    import sys

    rows = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("hippolm.ops"):
            continue
        for attr, fn in vars(module).items():
            if not isinstance(fn, JITFunction):
                continue
            for caches in fn.device_caches.values():
                for kernel in caches[0].values():
                    rows.append({"kernel": f"{name.rsplit('.', 1)[-1]}.{attr}", "regs": kernel.n_regs,
                                 "spills": kernel.n_spills, "shared_bytes": kernel.metadata.shared,
                                 "warps": kernel.metadata.num_warps, "stages": kernel.metadata.num_stages})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", default="loglinear_ssd,loglinear_gated_delta_rule")
    parser.add_argument("--T", type=int, default=8192)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="module.ATTR=INT",
                        help="a module-level kernel option under hippolm.ops, e.g. triton_loglinear.KV_V_PIECES=2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    for item in args.set:
        target, value = item.split("=")
        mod_name, attr = target.rsplit(".", 1)
        setattr(importlib.import_module("hippolm.ops." + mod_name), attr, int(value))
    out = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "date": datetime.date.today().isoformat(), "T": args.T, "B": args.B, "H": 16, "d": 128,
                    "dtype": "bfloat16", "set": args.set}, "ops": {}}
    for op in args.ops.split(","):
        before = {json.dumps(r, sort_keys=True) for r in compiled_kernels()}
        step(op, args.B, args.T, 16, 128)
        rows = [r for r in compiled_kernels() if json.dumps(r, sort_keys=True) not in before]
        out["ops"][op] = rows
        for r in rows:
            print(op, r, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
