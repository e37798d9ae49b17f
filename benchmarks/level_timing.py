"""Log-linear Gated DeltaNet level kernels (hippolm.ops.triton_gdn._LevelReads) per configuration, on
random bf16 (or --dtype float32) chunk factors of one training step (B=1, T=65536, H=16, d=128, chunk 64): forward and
forward+backward time through the autograd function (both lanes, their outputs added up), results
checked against the first configuration, each lane's kernel time from the profiler (the lower
levels on the current stream, the top levels on a side stream: the step takes about the longer), and
each launch's time in launch order with the level groups launched (which group is slow).

A configuration: forward/backward, each ``main+top@stages[wWARPS]`` with a tile ``levels x V
columns``, e.g. ``4x32+2x32@2/2x64+2x64@1w16`` (LEVEL_TILES, LEVEL_STAGES, LEVEL_WARPS; warps 8 if
left out), optionally a third part ``gBVwWARPSsSTAGES[u]`` for the gradient kernel (LEVEL_GRADS;
u: LEVEL_GRADS_UNIFORM = 1; e.g. ``.../g64w8s1``), or ``default`` (the tables as they are: the only
choice with --dtype float32, whose tiles are LEVEL_TILES' *_fp32); prefixed ``adj:`` (``adj`` alone: the
default tables) with a segment's V tiles adjacent on one grid axis (LEVEL_V_ADJACENT = 1). Writes JSON
(--json)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile

import torch
import triton
from ops_gpu import cuda_time_ms  # benchmarks/ is on the path when run as a script

from hippolm.ops import triton_gdn as tg


def factors(N: int, H: int, n: int, C: int, d: int, J: int, dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, device="cuda", generator=gen) * scale).to(dtype)

    w, kd, qw = (r(N, H, n, C, d, scale=d**-0.5) for _ in range(3))
    u = r(N, H, n, C, d)
    ge = torch.rand(N, H, n, device="cuda", generator=gen) * 0.5 + 0.5
    lam = torch.rand(N, H, n, C, J, device="cuda", generator=gen) + 0.5
    do = torch.randn(N, H, n, C, d, device="cuda", generator=gen).to(dtype)  # as the op's output gradient
    return w, u, kd, ge, qw, lam, do


def timed(fn) -> float:
    return cuda_time_ms(fn, warmup=1, repeats=3)


def configure(cfg: str) -> None:
    if cfg.startswith("adj"):
        tg.LEVEL_V_ADJACENT = 1
        cfg = cfg[4:] or "default"
    if cfg == "default":
        return
    parts = cfg.split("/")
    if len(parts) == 3:
        bv, _, rest = parts.pop()[1:].partition("w")
        warps, _, stages = rest.partition("s")
        tg.LEVEL_GRADS_UNIFORM = int(stages.endswith("u"))
        tg.LEVEL_GRADS["tf32"].update(BV=int(bv), num_warps=int(warps), num_stages=int(stages.rstrip("u")))
    for which, part in zip(("fwd", "bwd"), parts, strict=True):
        tiles, launch = part.split("@")
        main, top = (tuple(int(a) for a in t.split("x")) for t in tiles.split("+"))
        stages, _, warps = launch.partition("w")
        tg.LEVEL_TILES.update({which: main, which + "_top": top})
        tg.LEVEL_STAGES[which] = int(stages)
        tg.LEVEL_WARPS[which] = int(warps or 8)


def lane_times(step) -> tuple[dict, dict]:
    """Kernel time per (kernel, stream) in one call of ``step``, from a profiler trace, and each
    launch's time in launch order (one launch per level group: see ``groups`` in the JSON)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    out: dict[str, float] = {}
    launches: dict[str, list[float]] = {}
    for e in sorted((e for e in events if e.get("cat") == "kernel" and e["name"].startswith("_level")),
                    key=lambda e: e["ts"]):
        key = f"{e['name']} stream {e['args'].get('stream')}"
        out[key] = round(out.get(key, 0.0) + e["dur"] / 1e3, 3)
        launches.setdefault(key, []).append(round(e["dur"] / 1e3, 3))
    return out, launches


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--configs", default="default,4x32+2x32@2/2x64+2x64@1,4x32+2x32@2/2x64+2x32@2/g64w8s1")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    prec = "tf32" if dtype == torch.bfloat16 else "ieee"
    N, H, C, d = 1, 16, 64, 128
    n = args.T // C
    J = (n - 1).bit_length()
    w, u, kd, ge, qw, lam, do = factors(N, H, n, C, d, J, dtype)
    o0 = torch.zeros(N, H, n, C, d, device="cuda")  # the chunks' own output the level reads add to
    do = do.permute(0, 2, 3, 1, 4).reshape(N, n * C, H, d)  # as the output: [N, n * C, H, V]
    out = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "date": datetime.date.today().isoformat(), "N": N, "T": args.T, "H": H, "d": d, "C": C,
                    "chunk_levels": J, "dtype": args.dtype}, "rows": []}
    tables = (tg.LEVEL_TILES, tg.LEVEL_STAGES, tg.LEVEL_WARPS, tg.LEVEL_GRADS["tf32"])
    saved = [(table, dict(table)) for table in tables]
    uniform, adjacent = tg.LEVEL_GRADS_UNIFORM, tg.LEVEL_V_ADJACENT
    base = None
    for cfg in args.configs.split(","):
        row = {"config": cfg}
        try:
            configure(cfg)
            leaves = [t.detach().requires_grad_() for t in (w, u, kd, ge, qw, lam)]

            def fwd(leaves=leaves):
                return tg._LevelReads.apply(o0, *leaves, prec, dtype, dtype)

            def step(leaves=leaves):
                return torch.autograd.grad(fwd(leaves), leaves, do)

            result = [fwd(), *step()]
            base = base or result
            row["max_rel_diff"] = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                                      for a, b in zip(result, base, strict=True))
            row["fwd_ms"] = round(timed(fwd), 3)
            row["fwd_bwd_ms"] = round(timed(step), 3)
            row["kernel_ms_per_stream"], row["kernel_ms_per_launch"] = lane_times(step)
            # the launches of each pass: per lane (lower levels, then the top ones on the side stream)
            # its groups (first level, top level, programs) in launch order
            row["groups"] = {which: [[(j0, top, N * H * nseg * lane.NV) for j0, top, nseg in lane.groups]
                                     for lane in tg._level_lanes(n, J, d, d, which, prec)]
                             for which in ("fwd", "bwd")}
        except Exception as err:  # out of shared memory / registers
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        finally:
            for table, values in saved:
                table.update(values)
            tg.LEVEL_GRADS_UNIFORM, tg.LEVEL_V_ADJACENT = uniform, adjacent
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
        if args.json:  # after every row: a run cut short by its time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        if "error" in row and "illegal" in row["error"]:
            break  # the context is lost
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
