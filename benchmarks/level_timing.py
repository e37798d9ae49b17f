"""Time of each launch of the log-linear Gated DeltaNet level kernels (hippolm.ops.triton_gdn
_level_fwd / _level_bwd) per tiling (levels per program x V columns per level), on random bf16
chunk factors of one training step (B=1, T=65536, H=16, d=128, chunk 64): where the level time goes
(the top levels' few long scans or the low levels' many short ones), and what running the groups
concurrently on separate streams would give. Timing only: concurrent groups race on the outputs.
Writes JSON (--json)."""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton

from hippolm.ops import triton_gdn as tg


def factors(N: int, H: int, n: int, C: int, d: int, J: int):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, device="cuda", generator=gen) * scale).bfloat16()

    w, kd, qw = (r(N, H, n, C, d, scale=d**-0.5) for _ in range(3))
    u = r(N, H, n, C, d)
    ge = torch.rand(N, H, n, device="cuda", generator=gen) * 0.5 + 0.5
    lam = torch.rand(N, H, n, C, J, device="cuda", generator=gen) + 0.5
    do = torch.randn(N, H, n, C, d, device="cuda", generator=gen)
    return w, u, kd, ge, qw, lam, do


def launches(x, which: str, NL: int, BV: int):
    """One closure per group, launching its kernel (buffers allocated once per tiling)."""
    w, u, kd, ge, qw, lam, do = x
    N, H, n, C, K = w.shape
    V, J = u.shape[-1], lam.shape[-1]
    BK, NV = max(16, triton.next_power_of_2(K)), -(-V // BV)
    opts = tg._level_launch("tf32", tg._major(w.device), which == "bwd")
    fns = []
    if which == "fwd":
        o = torch.zeros(N, H, n, C, V, device="cuda")
        for j0, top, nseg in tg._level_groups(n, J, NL):
            fns.append(((j0, top, N * H * nseg * NV), lambda j0=j0, top=top, nseg=nseg: tg._level_fwd[
                (N * H * nseg, NV)](w, u, kd, ge, qw, lam, o, n, N * H, K, V, J, j0, top, C=C, BK=BK, BV=BV,
                                    NL=NL, PREC="tf32", **opts)))
        return fns
    hs = w.new_empty(N, H, n, K, NV * NL * BV)
    du = torch.zeros(N, H, n, C, V, device="cuda")
    dw, dkd, dqw = (torch.zeros(NV, N, H, n, C, K, device="cuda") for _ in range(3))
    dge = torch.zeros(NV, N, H, n, device="cuda")
    dlam = torch.zeros(NV, N, H, n, C, J, device="cuda")
    for j0, top, nseg in tg._level_groups(n, J, NL):
        fns.append(((j0, top, N * H * nseg * NV), lambda j0=j0, top=top, nseg=nseg: tg._level_bwd[
            (N * H * nseg, NV)](w, u, kd, ge, qw, lam, do, hs, du, dw, dkd, dqw, dge, dlam, n, N * H, K, V, J,
                                j0, top, C=C, BK=BK, BV=BV, NL=NL, PREC="tf32", **opts)))
    return fns


def timed(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def concurrent(fns, streams):
    main = torch.cuda.current_stream()
    for (_, fn), s in zip(reversed(fns), streams, strict=False):  # the top group (longest) first
        s.wait_stream(main)
        with torch.cuda.stream(s):
            fn()
    for s in streams[: len(fns)]:
        main.wait_stream(s)


def full(x, tilings: str) -> list[dict]:
    """The level reads through their autograd function (both lanes, partial sums added up), forward
    and backward timed apart per forward/backward tiling, results checked against the first tiling."""
    w, u, kd, ge, qw, lam, do = x
    saved, rows, base = dict(tg.LEVEL_TILES), [], None
    try:
        for cfg in tilings.split(","):
            fwd, bwd = (tuple(int(a) for a in part.split("x")) for part in cfg.split("/"))
            tg.LEVEL_TILES.update(fwd=fwd, bwd=bwd)
            row = {"tiles": cfg}
            try:
                leaves = [t.detach().requires_grad_() for t in (w, u, kd, ge, qw, lam)]
                o = tg._LevelReads.apply(*leaves, "tf32", torch.bfloat16)
                grads = torch.autograd.grad(o, leaves, do)
                out = [o, *grads]
                base = base or out
                row["max_rel_diff"] = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                                          for a, b in zip(out, base, strict=True))
                row["fwd_ms"] = round(timed(lambda: tg._LevelReads.apply(w, u, kd, ge, qw, lam, "tf32",
                                                                          torch.bfloat16)), 3)
                row["fwd_bwd_ms"] = round(timed(lambda leaves=leaves: torch.autograd.grad(
                    tg._LevelReads.apply(*leaves, "tf32", torch.bfloat16), leaves, do)), 3)
            except Exception as err:  # out of shared memory / registers
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
            torch.cuda.empty_cache()
    finally:
        tg.LEVEL_TILES.update(saved)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--fwd", default="4x32,2x32,1x32,1x16,2x64")
    ap.add_argument("--bwd", default="2x64,2x32,1x32,1x16,1x64")
    ap.add_argument("--full", default="4x32/2x64,2x32/2x32,4x32/1x64,2x32/1x32",
                    help="forward/backward tilings timed through the autograd function (first: the reference)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    N, H, C, d = 1, 16, 64, 128
    n = args.T // C
    J = (n - 1).bit_length()
    x = factors(N, H, n, C, d, J)
    streams = [torch.cuda.Stream() for _ in range(J)]
    out = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "date": datetime.date.today().isoformat(), "N": N, "T": args.T, "H": H, "d": d, "C": C,
                    "chunk_levels": J, "dtype": "bfloat16"}, "rows": []}
    out["full"] = full(x, args.full)
    for which, cfgs in (("fwd", args.fwd), ("bwd", args.bwd)):
        for cfg in cfgs.split(","):
            NL, BV = (int(a) for a in cfg.split("x"))
            row = {"pass": which, "tiles": cfg}
            try:
                fns = launches(x, which, NL, BV)
                row["groups"] = [{"levels": [j0, top], "programs": p, "ms": round(timed(fn), 3)}
                                 for (j0, top, p), fn in fns]
                row["sequential_ms"] = round(sum(g["ms"] for g in row["groups"]), 3)
                row["concurrent_ms"] = round(timed(lambda fns=fns: concurrent(fns, streams)), 3)
            except Exception as err:  # out of shared memory / registers
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            print(json.dumps(row), flush=True)
            out["rows"].append(row)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
