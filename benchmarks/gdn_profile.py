"""Where the time of one Gated DeltaNet / SSD (or log-linear, --ops) training step goes on the GPU,
and the tile settings of our gated backward kernel (hippolm.ops.fla_gated.dqkwg): CUDA kernel times from the torch
profiler for one fwd+bwd through the dispatch, then dqkwg timed per config and checked against the
default config's results. bf16, H=16, d=128. Writes JSON (--json)."""

from __future__ import annotations

import argparse
import datetime
import itertools
import json

import torch
import triton
from flag_timing import set_options  # benchmarks/ is on the path when run as a script

from hippolm import ops
from hippolm.ops import fla_gated


def inputs(B, T, H, d, grad):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, H, d, device="cuda", generator=gen).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(B, T, H, d, device="cuda", generator=gen), dim=-1).bfloat16()
    v = torch.randn(B, T, H, d, device="cuda", generator=gen).bfloat16()
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen) + 3)
    return [x.requires_grad_(grad) for x in (q, k, v, g)]


def profile(op: str, B: int, T: int, H: int, d: int) -> dict:
    xs = inputs(B, T, H, d, True)

    lam = torch.rand(B, T, H, ops.num_levels(T), device="cuda", generator=torch.Generator(device="cuda").manual_seed(
        1)).add_(0.5).requires_grad_()

    def step():
        q, k, v, g = xs
        beta = torch.sigmoid(g + 2)
        o, _ = {"gated_delta_rule": lambda: ops.gated_delta_rule(q, k, v, g, beta),
                "ssd": lambda: ops.ssd(q, k, v, g),
                "loglinear_gated_delta_rule": lambda: ops.loglinear_gated_delta_rule(q, k, v, g, beta, lam),
                "loglinear_ssd": lambda: ops.loglinear_ssd(q, k, v, g, lam)}[op]()
        torch.autograd.grad(o, [*xs, lam], torch.ones_like(o))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = {}
    for e in prof.key_averages():
        if e.device_time_total > 0:
            table[e.key[:80]] = round(e.device_time_total / 5 / 1e3, 4)  # ms per step
    return dict(sorted(table.items(), key=lambda kv: -kv[1])[:25])


def tune(B: int, T: int, H: int, d: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    NT = T // 64

    def r(*s, dtype=torch.bfloat16):
        return torch.randn(*s, device="cuda", generator=gen).to(dtype)

    q, k, v, do, dv = r(B, T, H, d), r(B, T, H, d) / d**0.5, r(B, T, H, d), r(B, T, H, d), r(B, T, H, d)
    g = -torch.rand(B, T, H, device="cuda", generator=gen).view(B, NT, 64, H).cumsum(2).view(B, T, H)
    h, dh = r(B, NT, H, d, d), r(B, NT, H, d, d, dtype=torch.float32)
    base = fla_gated.dqkwg(q, k, v, g, h, do, dh, d**-0.5, dv=dv)
    rows = []
    for BV, warps, stages in itertools.product((32, 64, 128), (4, 8), (1, 2, 3)):
        cfg = {"BK": 128, "BV": BV, "num_warps": warps, "num_stages": stages}
        row = dict(cfg)
        try:
            out = fla_gated.dqkwg(q, k, v, g, h, do, dh, d**-0.5, dv=dv, config=cfg)
            row["max_rel_diff"] = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                                      for a, b in zip(out, base, strict=True))
            row["ms"] = triton.testing.do_bench(
                lambda cfg=cfg: fla_gated.dqkwg(q, k, v, g, h, do, dh, d**-0.5, dv=dv, config=cfg), warmup=5, rep=30)
        except Exception as err:  # out of shared memory / registers
            row["error"] = f"{type(err).__name__}: {str(err)[:120]}"
        print(row, flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--ops", default="gated_delta_rule,ssd",
                    help="comma list of: gated_delta_rule, ssd, loglinear_gated_delta_rule, loglinear_ssd")
    ap.add_argument("--no-tune", action="store_true", help="skip the dqkwg config sweep")
    ap.add_argument("--set", action="append", default=[], metavar="module.ATTRIBUTE=INT",
                    help="a kernel option under hippolm.ops, e.g. triton_gdn.LEVEL_TREE_SAVE=1")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    set_options(args.set)
    H, d = 16, 128
    out = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "date": datetime.date.today().isoformat(), "B": args.B, "T": args.T, "H": H, "d": d,
                    "dtype": "bfloat16", "default_config": fla_gated.CONFIG, "set": args.set}}
    for op in args.ops.split(","):
        out[f"profile_{op}_ms"] = profile(op, args.B, args.T, H, d)
        print(op, json.dumps(out[f"profile_{op}_ms"], indent=1), flush=True)
    if not args.no_tune:
        out["dqkwg_configs"] = tune(args.B, args.T, H, d)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
