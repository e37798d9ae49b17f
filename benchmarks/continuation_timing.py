"""Chunked prefill of the log-linear ops on the GPU: T new tokens continuing a LogLinearState at
position p (the slots a real prefix leaves), against the same T tokens from position 0, bf16, H=16,
d=128, batch 1; the Triton path (``backend="triton"``) and the reference (``"torch"``, what a
continuation of log-linear Gated DeltaNet ran before it had a Triton path):

    python benchmarks/continuation_timing.py --json $OUT/continuation_timing_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton
from ops_gpu import cuda_time_ms  # benchmarks/ is on the path when run as a script

from hippolm import ops


def inputs(op: str, T: int, L: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    bf, H, d = torch.bfloat16, 16, 128

    def r(*s):
        return torch.randn(*s, device="cuda", generator=gen)

    q, v = r(1, T, H, d).to(bf), r(1, T, H, d).to(bf)
    k = torch.nn.functional.normalize(r(1, T, H, d), dim=-1).to(bf)
    g = -torch.rand(1, T, H, device="cuda", generator=gen) * 0.1
    lam = torch.rand(1, T, H, L, device="cuda", generator=gen)
    if op == "loglinear_ssd":
        return [q, k * d**0.5 / 4, v, g, lam]
    return [q, k, v, g, torch.rand(1, T, H, device="cuda", generator=gen), lam]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", default="loglinear_gated_delta_rule,loglinear_ssd")
    parser.add_argument("--new", default="4096,16384", help="new tokens per call")
    parser.add_argument("--start", type=int, default=57347, help="position the continuation starts at")
    parser.add_argument("--torch-max", type=int, default=4096, help="longest call also timed on the reference")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for op in args.ops.split(","):
        fn = getattr(ops, op)
        for new in (int(x) for x in args.new.split(",")):
            L = ops.num_levels(args.start + new)
            prefix = inputs(op, args.start, L, seed=1)
            with torch.no_grad():
                _, state = fn(*prefix, output_final_state=True, backend="triton")
            del prefix
            xs = inputs(op, new, L, seed=2)
            for backend in ("triton", "torch"):
                if backend == "torch" and new > args.torch_max:
                    continue
                for start, init in ((args.start, state), (0, None)):
                    def call(fn=fn, xs=xs, init=init, backend=backend):
                        with torch.no_grad():
                            return fn(*xs, initial_state=init, output_final_state=True, backend=backend)

                    try:
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        call()
                        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                        ms = cuda_time_ms(call)
                    except ValueError as e:  # an older tree (SRC=...) without this path
                        print(f"{op} T={new} from {start} {backend}: {e}", flush=True)
                        continue
                    rows.append({"op": op, "new_tokens": new, "start": start, "backend": backend, "ms": ms,
                                 "peak_gib": peak})
                    print(f"{op:27s} T={new:>6} from {start:>6} {backend:6s}: {ms:8.2f} ms, peak +{peak:6.2f} GiB",
                          flush=True)
            if new <= args.torch_max and any(r.get("start") and r.get("backend") == "triton" and r["op"] == op
                                           for r in rows):  # the two paths agree on the continuation
                o_t, s_t = fn(*xs, initial_state=state, output_final_state=True, backend="triton")
                o_r, s_r = fn(*xs, initial_state=state, output_final_state=True, backend="torch")
                err = ((o_t.float() - o_r.float()).norm() / o_r.float().norm()).item()
                serr = ((s_t.slots - s_r.slots).norm() / s_r.slots.norm()).item()
                rows.append({"op": op, "new_tokens": new, "start": args.start, "rel_err_o": err, "rel_err_slots": serr})
                print(f"{op:27s} T={new:>6} triton vs torch: o {err:.2e}, slots {serr:.2e}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "dtype": "bfloat16", "H": 16, "d": 128, "batch": 1,
            "mode": "forward, no grad, output_final_state=True"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
