"""Chunkwise vs token-by-token reference on CPU (issue: chunk must be >= 5x faster).

    python benchmarks/ops_cpu.py [--json benchmarks/results/ops_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from hippolm import ops


def best_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    B, T, H, d = args.B, args.T, args.H, args.d
    torch.manual_seed(0)
    q, v = torch.randn(B, T, H, d), torch.randn(B, T, H, d)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, d), dim=-1)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H) + 3)
    beta = torch.rand(B, T, H)
    gates = {"ssd": (g,), "delta_rule": (beta,), "gated_delta_rule": (g, beta)}
    rows = []
    print(f"CPU, float32, B={B} H={H} T={T} d={d}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'op':<18}{'recurrent ms':>14}{'chunk ms':>10}{'speed-up':>10}")
    for op, gs in gates.items():
        rec = best_time(lambda op=op, gs=gs: getattr(ops, f"{op}_recurrent")(q, k, v, *gs), repeats=1)
        chk = best_time(lambda op=op, gs=gs: getattr(ops, f"{op}_chunk")(q, k, v, *gs))
        rows.append({"op": op, "recurrent_s": rec, "chunk_s": chk, "speedup": rec / chk})
        print(f"{op:<18}{rec * 1e3:>14.1f}{chk * 1e3:>10.1f}{rec / chk:>9.1f}x")
    if args.json:
        meta = {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                "shape": {"B": B, "T": T, "H": H, "d": d, "dtype": "float32"}}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
