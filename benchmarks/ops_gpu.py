"""Throughput of the recurrent-memory ops on a CUDA GPU: our dispatch vs FLA called directly vs
SDPA flash attention, bf16, H=16, d=128, a fixed number of tokens per batch (B = tokens / T).

    python benchmarks/ops_gpu.py --json benchmarks/results/ops_gpu_h100.json

Each row times forward only and forward+backward (median of CUDA-event timings after warm-up)
and says which backend our dispatch picked. Where FLA refuses to run, the row says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics

import torch
import torch.nn.functional as F

from hippolm import ops
from hippolm.ops import fla_backend

OPS = {"ssd": ("g",), "delta_rule": ("beta",), "gated_delta_rule": ("g", "beta")}


def cuda_time_ms(fn, warmup: int = 3, repeats: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make(op: str, B: int, T: int, H: int, d: int, grad: bool):
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, T, H, d, device=dev, dtype=dt)
    k = F.normalize(torch.randn(B, T, H, d, device=dev, dtype=torch.float32), dim=-1).to(dt)
    v = torch.randn(B, T, H, d, device=dev, dtype=dt)
    gates = {"g": F.logsigmoid(torch.randn(B, T, H, device=dev) + 4), "beta": torch.rand(B, T, H, device=dev)}
    args = [q, k, v] + [gates[n] for n in OPS[op]]
    return [x.requires_grad_(grad) for x in args]


def timed(call, args, backward: bool):
    def fwd():
        return call(*args)

    def fwd_bwd():
        o = call(*args)
        o = o[0] if isinstance(o, tuple) else o
        o.backward(torch.ones_like(o))

    return cuda_time_ms(fwd_bwd if backward else fwd)


def attempt(call, args, backward: bool):
    try:
        return timed(call, args, backward), None
    except Exception as err:  # record refusals (e.g. FLA's Hopper guard) instead of crashing the sweep
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    finally:
        torch.cuda.empty_cache()


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)


def fla_direct(op):
    if op == "ssd":
        from fla.ops.simple_gla import chunk_simple_gla as f
        return lambda q, k, v, g: f(q, k, v, g=g)
    if op == "delta_rule":
        from fla.ops.delta_rule import chunk_delta_rule as f
        return lambda q, k, v, beta: f(q, k, v, beta=beta)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as f
    return lambda q, k, v, g, beta: f(q, k, v, g=g, beta=beta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="2048,8192,32768,65536")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    H, d = args.heads, args.dim
    import fla
    import triton
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "fla": getattr(fla, "__version__", "?"), "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "dtype": "bfloat16", "heads": H, "head_dim": d,
            "tokens_per_batch": args.tokens}
    rows = []

    def save():  # after every length, so a run cut short still leaves its numbers
        for r in rows:
            r["tokens_per_s"] = None if r["ms"] is None else r["B"] * r["T"] / (r["ms"] / 1e3)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": rows}, f, indent=2)

    for T in (int(x) for x in args.lengths.split(",")):
        B = max(1, args.tokens // T)
        for backward in (False, True):
            qkv = [torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                   for _ in range(3)]
            ms, err = attempt(sdpa, qkv, backward)
            rows.append({"T": T, "B": B, "impl": "sdpa_flash", "op": "attention", "backward": backward,
                         "ms": ms, "error": err})
            del qkv
            for op in OPS:
                x = make(op, B, T, H, d, backward)
                form, why = fla_backend.plan(op, "chunk", x[0], x[2], x)
                picked = f"fla-{form}" if form else "torch"
                ms, err = attempt(getattr(ops, op), x, backward)
                rows.append({"T": T, "B": B, "impl": f"hippolm({picked})", "op": op, "backward": backward,
                             "ms": ms, "error": err, "dispatch": why})
                ms, err = attempt(fla_direct(op), x, backward)
                rows.append({"T": T, "B": B, "impl": "fla_direct", "op": op, "backward": backward,
                             "ms": ms, "error": err})
                del x
        save()
        print(f"T={T} done", flush=True)
    print(json.dumps(meta))
    print(f"{'T':>6} {'pass':>8} {'op':<18}{'impl':<16}{'ms':>10}  note")
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
        note = r.get("error") or ""
        print(f"{r['T']:>6} {'fwd+bwd' if r['backward'] else 'fwd':>8} {r['op']:<18}{r['impl']:<16}{ms:>10}  {note}")


if __name__ == "__main__":
    main()
