"""A/B timing of a module-level kernel option, in one process: forward+backward (and forward) of one
op at the shape of benchmarks/kernel_bench.py (bf16, H=16, d=128, 65,536 tokens per batch) for each
value of the option, e.g. log-linear Mamba-2 with and without float32 operands in its backward:

    python benchmarks/flag_timing.py --op loglinear_ssd --flag triton_loglinear.GRAD_OPERANDS --values 1,2 \
        --lengths 8192,65536 --json $OUT/flag_timing_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json

import torch
import triton
from ops_gpu import cuda_time_ms  # benchmarks/ is on the path when run as a script

from hippolm import ops


def inputs(op: str, B: int, T: int, H: int, d: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    bf = torch.bfloat16

    def r(*s, scale=1.0):
        return (torch.randn(*s, device="cuda", generator=gen) * scale).to(bf).requires_grad_()

    q, k, v = r(B, T, H, d), r(B, T, H, d, scale=d**-0.5), r(B, T, H, d)
    g = (-torch.rand(B, T, H, device="cuda", generator=gen) * 0.1).requires_grad_()
    lam = torch.rand(B, T, H, ops.num_levels(T), device="cuda", generator=gen).requires_grad_()
    if op == "loglinear_ssd":
        return lambda: ops.loglinear_ssd(q, k, v, g, lam, backend="triton")[0], (q, k, v, g, lam)
    beta = torch.rand(B, T, H, device="cuda", generator=gen).requires_grad_()
    kn = torch.nn.functional.normalize(k.detach().float(), dim=-1).to(bf).requires_grad_()
    return (lambda: ops.loglinear_gated_delta_rule(q, kn, v, g, beta, lam, backend="triton")[0],
            (q, kn, v, g, beta, lam))


def set_option(name: str, value: int) -> None:
    """Set the module-level kernel option ``module.ATTRIBUTE`` under hippolm.ops (its own type), or
    an entry of a dict option, ``module.ATTRIBUTE.key`` (e.g. triton_gdn_tree.TREE_BWD_TILES.pairs_BV)."""
    mod_name, attr, *key = name.split(".")
    module = importlib.import_module("hippolm.ops." + mod_name)
    if key:
        table = getattr(module, attr)
        table[key[0]] = type(table[key[0]])(value)
    else:
        setattr(module, attr, type(getattr(module, attr))(value))


def set_options(items: list[str]) -> None:
    """``module.ATTRIBUTE=INT`` items, as --set takes them (also benchmarks/kernel_spills.py)."""
    for item in items:
        name, value = item.split("=")
        set_option(name, int(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--op", default="loglinear_ssd", choices=["loglinear_ssd", "loglinear_gated_delta_rule"])
    parser.add_argument("--flag", required=True, help="module.ATTRIBUTE under hippolm.ops")
    parser.add_argument("--values", default="1,0", help="comma-separated integers")
    parser.add_argument("--lengths", default="8192,65536")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--set", action="append", default=[], metavar="module.ATTRIBUTE=INT",
                        help="another option held fixed for every value, e.g. triton_loglinear.GRAD_OPERANDS=2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_options(args.set)
    rows = []
    for T in (int(x) for x in args.lengths.split(",")):
        run, xs = inputs(args.op, max(1, args.tokens // T), T, 16, 128)
        do = torch.randn_like(run())
        for value in (int(x) for x in args.values.split(",")):
            set_option(args.flag, value)

            def fwd_bwd(run=run, xs=xs, do=do):
                torch.autograd.grad(run(), xs, do)

            fwd_ms = cuda_time_ms(run)
            ms = cuda_time_ms(fwd_bwd)
            rows.append({"T": T, "value": value, "fwd_ms": fwd_ms, "fwd_bwd_ms": ms})
            print(f"T={T:>6} {args.flag}={value}: fwd {fwd_ms:7.2f} ms, fwd+bwd {ms:7.2f} ms", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "op": args.op, "flag": args.flag, "set": args.set,
            "dtype": "bfloat16", "H": 16, "d": 128, "tokens_per_batch": args.tokens}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
