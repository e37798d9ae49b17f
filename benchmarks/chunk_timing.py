"""Log-linear Gated DeltaNet's fused chunk kernels (hippolm.ops.triton_gdn_chunk.ChunkParts) per
configuration, on random bf16 inputs of one training step (B=1, T=65536, H=16, d=128, chunk 64):
forward and backward kernel time (the backward with random gradients of every output), results
compared with the first configuration's, output by output (a difference beyond rounding is a broken
configuration: start with one whose errors kernel_errors.py has measured). Writes JSON (--json).

A configuration: tokens joined by ':', e.g. ``merge:w8:k64:v64`` (the forward's solve, warps, K
and V columns per step, for both kernels; CHUNK_TILES; ``q4``: the backward's second kernel's
warps), or ``default`` (the tables as they are).

    python benchmarks/chunk_timing.py --configs "default;rows:w8;merge:w8" --json $OUT/chunk_timing_h100.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json

import torch
import triton
from ops_gpu import cuda_time_ms  # benchmarks/ is on the path when run as a script

from hippolm.ops import triton_gdn_chunk as tc


def configure(cfg: str) -> None:
    if cfg == "default":
        return
    for tok in cfg.split(":"):
        if tok in ("rows", "merge", "merge_loads"):
            tc.CHUNK_TILES["fwd"]["solve"] = tok
        elif tok[0] == "q":  # the second backward kernel's warps
            tc.CHUNK_TILES["bwd"]["qk_warps"] = int(tok[1:])
        else:
            key = {"w": "num_warps", "k": "BK", "v": "BV", "s": "num_stages"}[tok[0]]
            for table in tc.CHUNK_TILES.values():
                table[key] = int(tok[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--configs", default="default;rows;merge:w8;merge:k128:v128")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    N, H, C, d, L = 1, 16, 64, 128, (args.T - 1).bit_length() + 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    T = args.T

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    q, v = r(N, T, H, d).bfloat16(), r(N, T, H, d).bfloat16()
    k = torch.nn.functional.normalize(r(N, T, H, d), dim=-1).bfloat16()
    g = torch.nn.functional.logsigmoid(r(N, T, H) + 3)
    beta, lam = torch.sigmoid(r(N, T, H)), torch.rand(N, T, H, L, device="cuda", generator=gen) + 0.25
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta, lam)]
    out = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "date": datetime.date.today().isoformat(), "N": N, "T": T, "H": H, "d": d, "C": C,
                    "dtype": "bfloat16", "defaults": copy.deepcopy(tc.CHUNK_TILES)}, "rows": []}
    saved = copy.deepcopy(tc.CHUNK_TILES)
    base, grads = None, None
    for cfg in args.configs.split(";"):
        row = {"config": cfg}
        try:
            configure(cfg)

            def fwd():
                return tc.ChunkParts.apply(*leaves, d**-0.5, C, False, "tf32", torch.bfloat16)

            outs = fwd()
            grads = grads or [torch.randn(o.shape, device="cuda", generator=gen).to(o.dtype) for o in outs]

            def bwd(outs=outs, grads=grads):
                return torch.autograd.grad(outs, leaves, grads, retain_graph=True)

            result = [*outs, *bwd()]
            base = base or result
            names = ("w", "u", "kd", "qw", "ge", "o", "mix", "dq", "dk", "dv", "dg", "dbeta", "dlam")
            row["rel_diff"] = {name: float(f"{((a.float() - b.float()).norm() / b.float().norm()).item():.3g}")
                               for name, a, b in zip(names, result, base, strict=True) if b.numel()}
            row["fwd_ms"] = round(cuda_time_ms(fwd, warmup=1, repeats=5), 3)
            row["bwd_ms"] = round(cuda_time_ms(bwd, warmup=1, repeats=5), 3)
        except Exception as err:  # out of shared memory / registers
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        finally:
            tc.CHUNK_TILES.update(copy.deepcopy(saved))
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
        if "error" in row and "illegal" in row["error"]:
            break  # the context is lost
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
