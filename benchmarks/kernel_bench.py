"""Our Triton kernels on a CUDA GPU next to FLA (called directly, where it runs) and SDPA flash
attention: bf16, H=16, d=128, a fixed number of tokens per batch (B = tokens / T, at least 1).

    python benchmarks/kernel_bench.py --json benchmarks/results/kernels_h100.json [--quick] [--budget 330]

Each row: forward and forward+backward (median of CUDA-event timings after warm-up), the FLOPs
the algorithm performs (formulas in ``meta.flops``) as TFLOP/s, the compulsory I/O (inputs,
outputs, gradients) as GB/s, and their fractions of the H100 ceilings (789 TFLOP/s bf16 dense,
3.0 TB/s). The JSON is rewritten after every row, so a run cut short keeps what it measured;
rows past ``--budget`` seconds are skipped (recorded as such), least important first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hippolm import ops

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under python -P
import ops_gpu  # the shared CUDA-event timer

PEAK_TFLOPS, PEAK_TBS = 789.0, 3.0
FLOPS_DOC = {
    "sdpa_flash": "causal: fwd 2 B H T^2 d (QK^T and PV, half masked), fwd+bwd 3.5x fwd",
    "loglinear_ssd": "per head, chunk C=64: fwd 2 T C (K+V) (intra block) + 2 T K V (chunk states) + "
                     "2 T K V sum_j P(bit j set) (level reads, ~ J/2); fwd+bwd 3x fwd",
    "linear": "per head, chunk C=64: fwd 2 T C (K+V) + 4 T K V; fwd+bwd 3x fwd",
}


DEVICE = "cuda"


def cuda_time_ms(fn, warmup: int, repeats: int) -> float:
    if DEVICE == "cpu":  # --dry-run: wall clock
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return ops_gpu.cuda_time_ms(fn, warmup, repeats)


def loglinear_flops(B: int, T: int, H: int, d: int, C: int = 64) -> float:
    n = -(-T // C)
    reads = sum(sum((i >> j) & 1 for i in range(n)) for j in range(max(n - 1, 0).bit_length())) * C
    return B * H * (2 * T * C * 2 * d + 2 * T * d * d + 2 * reads * d * d)


def inputs(B: int, T: int, H: int, d: int, grad: bool, levels: bool):
    dev, dt = DEVICE, (torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    q = torch.randn(B, T, H, d, device=dev, dtype=dt)
    k = F.normalize(torch.randn(B, T, H, d, device=dev), dim=-1).to(dt)
    v = torch.randn(B, T, H, d, device=dev, dtype=dt)
    g = F.logsigmoid(torch.randn(B, T, H, device=dev) + 4)
    xs = [q, k, v, g]
    if levels:
        xs.append(F.softplus(torch.randn(B, T, H, ops.num_levels(T), device=dev)))
    return [x.requires_grad_(grad) for x in xs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="2048,4096,8192,16384,32768,65536,131072")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="lengths 2k, 8k, 64k; fewer repeats; no FLA log-linear")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds; later rows are skipped past it")
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--phases", default="ours,breakdown,fla_linear,fla_loglinear",
                        help="comma list of: ours (log-linear kernels, SDPA), breakdown (our log-linear "
                             "kernel phases), fla_linear (SSD and GDN through the dispatch, linear SSD on our "
                             "kernels, FLA's linear kernels), fla_loglinear")
    parser.add_argument("--ops", default="loglinear_ssd,loglinear_gated_delta_rule,attention",
                        help="the 'ours' phase's ops (attention: SDPA flash, the baseline)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU under TRITON_INTERPRET=1, tiny shapes: checks the script, times nothing real")
    args = parser.parse_args()
    op_set = set(args.ops.split(","))
    if args.quick:
        args.lengths = "2048,8192,65536"
    if args.dry_run:
        global DEVICE
        DEVICE = "cpu"
        args.lengths, args.tokens, args.heads, args.dim = "100,200", 200, 2, 16
    warmup, repeats = (1, 3) if args.quick else (2, 7)
    H, d = args.heads, args.dim
    t_start = time.time()
    import triton
    try:
        import fla
        fla_version = getattr(fla, "__version__", "?")
    except ImportError:
        fla_version = None
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    meta = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
            "fla": fla_version, "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "dtype": "bfloat16", "heads": H, "head_dim": d, "tokens_per_batch": args.tokens,
            "peak_tflops": PEAK_TFLOPS, "peak_tb_s": PEAK_TBS, "flops": FLOPS_DOC, "quick": args.quick,
            "io": "compulsory bytes: fwd = inputs + o; fwd+bwd = 3 x inputs + 2 x outputs"}
    rows: list[dict] = []

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": rows}, f, indent=2)

    def measure(T, B, impl, op, backward, call, make, flops, io_bytes, optional=False):
        row = {"T": T, "B": B, "impl": impl, "op": op, "backward": backward, "ms": None, "error": None}
        if time.time() - t_start > args.budget * (0.7 if optional else 1.0):
            row["error"] = "skipped: time budget"
        else:
            try:
                xs = make(backward)

                leaves = [x for x in xs if x.requires_grad]

                def fn():
                    o = call(*xs)
                    o = o[0] if isinstance(o, tuple) else o
                    if backward:  # gradients returned, not accumulated into .grad (an add per input)
                        torch.autograd.grad(o, leaves, torch.ones_like(o))

                row["ms"] = cuda_time_ms(fn, warmup, repeats)
            except Exception as err:  # record refusals (FLA's Hopper guard, OOM) instead of stopping the sweep
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            finally:
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
        if row["ms"] is not None:
            mult = (3.5 if op == "attention" else 3.0) if backward else 1.0
            sec = row["ms"] / 1e3
            row["tflops"] = flops * mult / sec / 1e12
            inp, out = io_bytes  # fwd+bwd: forward, then inputs and do read again, gradients written
            row["gb_s"] = ((3 * inp + 2 * out) if backward else (inp + out)) / sec / 1e9
            row["frac_peak_flops"] = row["tflops"] / PEAK_TFLOPS
            row["frac_peak_bw"] = row["gb_s"] / (PEAK_TBS * 1e3)
            row["tokens_per_s"] = B * T / sec
        rows.append(row)
        save()  # after every row: a run cut short keeps what it measured
        ms = "-" if row["ms"] is None else f"{row['ms']:.2f}"
        extra = f"{row['tflops']:.0f} TFLOP/s" if row["ms"] is not None else row["error"]
        print(f"T={T:>6} B={B:>2} {'fwd+bwd' if backward else 'fwd':>7} {op:<27}{impl:<30}{ms:>9} ms  {extra}",
              flush=True)

    def breakdown(T: int) -> None:
        """ms of each kernel phase of ours at one length (what to optimise next)."""
        from hippolm.ops import triton_backend
        kern = triton_backend.kernels()
        B = max(1, args.tokens // T)
        q, k, v, g, lam = inputs(B, T, H, d, False, True)
        p = kern._Plan(q, v, lam, 64 if DEVICE == "cuda" else 16)
        scale = d**-0.5
        gl, gch = kern._decays(g, p)
        lam_f = lam.float().contiguous()
        o, tree = kern._forward(q, k, v, gl, lam_f, gch, scale, p)
        do = torch.randn_like(o)
        phases = {
            "decays (torch)": lambda: kern._decays(g, p),
            "tree build": lambda: kern._build_tree(k, v, gl, gch, p),
            "forward (tree + read)": lambda: kern._forward(q, k, v, gl, lam_f, gch, scale, p),
            "backward (all)": lambda: kern._backward(q, k, v, gl, lam_f, gch, tree, do, scale, p),
        }

        def bf16_tree_forward():  # the accuracy/bandwidth trade-off of TREE_FP32
            kern.TREE_FP32 = False
            try:
                return kern._forward(q, k, v, gl, lam_f, gch, scale, kern._Plan(q, v, lam, p.C))
            finally:
                kern.TREE_FP32 = True

        phases["forward, 16-bit tree"] = bf16_tree_forward
        out = {}
        for name, fn in phases.items():
            try:
                out[name] = cuda_time_ms(fn, warmup, repeats)
            except Exception as err:
                out[name] = f"{type(err).__name__}: {str(err)[:120]}"
        meta.setdefault("breakdown_ms", {})[str(T)] = out
        save()
        print(f"breakdown T={T}: {out}", flush=True)

    lengths = [int(x) for x in args.lengths.split(",")]
    fla_ok = fla_version is not None and not args.no_fla
    # Phases, most important first: ours and SDPA at every length, then FLA's linear kernels, then
    # FLA's log-linear kernel (slow, and may autotune for minutes).
    phases = [("ours", False), ("breakdown", True), ("fla_linear", True)]
    phases += [] if args.quick else [("fla_loglinear", True)]
    chosen = args.phases.split(",")
    phases = [(name, optional and len(chosen) > 1) for name, optional in phases if name in chosen]
    for phase, optional in phases:
        if phase == "breakdown":
            if time.time() - t_start < args.budget * 0.6 or not optional:
                breakdown(65536 if 65536 in lengths else max(lengths))
            continue
        if phase != "ours" and not fla_ok:
            continue
        for T in lengths:
            B = max(1, args.tokens // T)
            L = ops.num_levels(T)
            tok = B * T * H
            io = (tok * (3 * d * 2 + 4 + 4 * L), tok * d * 2)  # in: q, k, v (bf16), g, lam (fp32); out: o
            lin_io, attn_io = (tok * (3 * d * 2 + 4), tok * d * 2), (tok * 3 * d * 2, tok * d * 2)
            ll_flops = loglinear_flops(B, T, H, d)
            lin_flops = B * H * (2 * T * 64 * 2 * d + 4 * T * d * d)
            attn_flops = 2 * B * H * T * T * d

            def make(grad, B=B, T=T, levels=False):
                return inputs(B, T, H, d, grad, levels)

            for backward in (False, True):
                if phase == "ours":
                    if "loglinear_ssd" in op_set:
                        measure(T, B, "hippolm-triton", "loglinear_ssd", backward,
                                lambda q, k, v, g, lam: ops.loglinear_ssd(q, k, v, g, lam, backend="triton"),
                                lambda grad, make=make: make(grad, levels=True), ll_flops, io)
                    if "loglinear_gated_delta_rule" in op_set:
                        measure(T, B, "hippolm-triton", "loglinear_gated_delta_rule", backward,
                                lambda q, k, v, g, lam: ops.loglinear_gated_delta_rule(
                                    q, k, v, g, torch.sigmoid(g + 2), lam, backend="triton"),
                                lambda grad, make=make: make(grad, levels=True), ll_flops, io)
                    if "attention" in op_set:
                        measure(T, B, "sdpa_flash", "attention", backward,
                                lambda q, k, v: F.scaled_dot_product_attention(
                                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True),
                                lambda grad, make=make: make(grad)[:3], attn_flops, attn_io)
                elif phase == "fla_linear":
                    from fla.ops.delta_rule import chunk_delta_rule
                    from fla.ops.simple_gla import chunk_simple_gla
                    measure(T, B, "hippolm-dispatch(auto)", "ssd", backward,
                            lambda q, k, v, g: ops.ssd(q, k, v, g), make, lin_flops, lin_io, optional)
                    measure(T, B, "hippolm-dispatch(auto)", "gated_delta_rule", backward,
                            lambda q, k, v, g: ops.gated_delta_rule(q, k, v, g, torch.sigmoid(g + 2)), make,
                            lin_flops, lin_io, optional)
                    measure(T, B, "hippolm-triton", "ssd", backward,
                            lambda q, k, v, g: ops.ssd(q, k, v, g, backend="triton"), make, lin_flops, lin_io,
                            optional)
                    measure(T, B, "fla_direct(chunk_simple_gla)", "ssd", backward,
                            lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g), make, lin_flops, lin_io, optional)
                    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
                    measure(T, B, "fla_direct(chunk_gated_delta_rule)", "gated_delta_rule", backward,
                            lambda q, k, v, g: chunk_gated_delta_rule(q, k, v, g=g, beta=torch.sigmoid(g + 2)), make,
                            lin_flops, lin_io, optional)
                    measure(T, B, "fla_direct(chunk_delta_rule)", "delta_rule", backward,
                            lambda q, k, v, g: chunk_delta_rule(q, k, v, beta=torch.sigmoid(g)), make, lin_flops,
                            lin_io, optional)
                else:
                    from fla.ops.log_linear_attn import chunk_log_linear_attn
                    measure(T, B, "fla_direct(log_linear_attn)", "loglinear_ssd", backward,
                            lambda q, k, v, g, lam: chunk_log_linear_attn(q, k, v, g, lam, scale=None),
                            lambda grad, make=make: make(grad, levels=True), ll_flops, io, optional)
    print(json.dumps({k: v for k, v in meta.items() if k != "flops"}))
    ours = {(r["T"], r["backward"]): r["ms"] for r in rows
            if r["impl"] == "hippolm-triton" and r["op"] == "loglinear_ssd"}
    sdpa = {(r["T"], r["backward"]): r["ms"] for r in rows if r["impl"] == "sdpa_flash"}
    for (T, bwd), ms in sorted(ours.items()):
        ref = sdpa.get((T, bwd))
        if ms and ref:
            print(f"T={T:>6} {'fwd+bwd' if bwd else 'fwd':>7}: log-linear Mamba-2 {ms:.2f} ms vs SDPA {ref:.2f} ms "
                  f"({ref / ms:.2f}x)")
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
