"""The AHN memory's cached decode step (hippolm.ops.decode.memory_step_from_cache: the evicted token's
key/value and gates read from the ring, the Gated DeltaNet state update, the read-out with RMSNorm,
output gate and per-head projection) per launch configuration, at the Qwen2.5-3B decode shape of
benchmarks/ahn_decode.py (batch 8, 16 heads over 2 KV heads, d = 128, 128 sinks + 32,640 window,
bf16 cache, float32 state). 36 calls (one per layer, each on its own state) are captured in a CUDA
graph and replayed, so the time per call is kernel time plus the gap between graph nodes, as in a
decode step. Bytes: the state read and written, the projection block, k, v, q, gates.

    python benchmarks/decode_step_timing.py --json benchmarks/results/decode_step_timing_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton
from ops_gpu import cuda_time_ms  # benchmarks/ is on the path when run as a script

from hippolm.ops import decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--warps", default="4,8,16")
    parser.add_argument("--splits", default="",
                        help="also time the decode attention (AHN: sinks + window; full: --full-context "
                             "slots) per key-buffer split count (0: the default rule)")
    parser.add_argument("--full-context", type=int, default=131072)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--batch", type=int, default=8,
                        help="sequences (the memory step runs one program per sequence and head: at 16, two "
                             "per SM, which says whether splitting a state over programs would pay)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    B, H, Hkv, d, S, W, L = args.batch, 16, 2, 128, 128, 32640, args.layers
    dev, bf = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    keys = torch.randn(B, Hkv, S + W, d, device=dev, dtype=bf, generator=gen)
    values = torch.randn(B, Hkv, S + W, d, device=dev, dtype=bf, generator=gen)
    ring = torch.stack([-torch.rand(B, W, H, device=dev, generator=gen),
                        torch.rand(B, W, H, device=dev, generator=gen)], -1).to(bf)
    cursor = torch.full((B,), 100_000, dtype=torch.long, device=dev)
    q = torch.randn(B, H, d, device=dev, dtype=bf, generator=gen)
    gate = torch.randn(B, H, device=dev, dtype=bf, generator=gen)
    norm_w = torch.ones(d, device=dev, dtype=bf)
    o_proj = torch.randn(H, d, d, device=dev, dtype=bf, generator=gen) * d**-0.5
    states = [torch.randn(B, H, d, d, device=dev, generator=gen) * 0.01 for _ in range(L)]
    byte_count = B * H * (2 * d * d * 4 + 3 * d * 2 + 2 * 2) + H * d * d * 2

    def step():
        for state in states:
            decode.memory_step_from_cache(q, keys, values, ring, cursor, S, W, 0, 1, True, state, norm_w, gate,
                                          o_proj=o_proj)

    rows = []
    for warps in (int(w) for w in args.warps.split(",")):
        decode.MEMORY_STEP_WARPS = warps
        us = graph_us(step, L)
        rows.append({"num_warps": warps, "us_per_call": us, "bytes_per_call": byte_count,
                     "bytes_per_s": byte_count / us * 1e6})
        print(f"warps {warps:>2}: {us:6.2f} us per call, {byte_count / us / 1e6:6.3f} TB/s", flush=True)
    attention = attention_rows(args, q, keys, values, cursor, S, W) if args.splits else []
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "shape": {"B": B, "H": H, "Hkv": Hkv, "d": d, "sinks": S,
                                                                 "window": W, "calls_per_graph": L}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "attention_rows": attention}, f, indent=1)


def graph_us(step, calls: int) -> float:
    """Microseconds per call of ``step`` (``calls`` calls) replayed as one CUDA graph."""
    step()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return cuda_time_ms(graph.replay, warmup=3, repeats=20) * 1e3 / calls


def attention_rows(args, q, keys, values, cursor, S: int, W: int) -> list[dict]:
    """The decode attention per split count: an AHN cache (the window full) and a full cache of
    --full-context slots, each read ``args.layers`` times per graph (every read > L2, so no reuse)."""
    B, Hkv, _, d = keys.shape
    slot_pos = torch.arange(S + W, device=q.device, dtype=torch.int32).expand(B, -1).contiguous()
    full_k = torch.randn(B, Hkv, args.full_context, d, device=q.device, dtype=keys.dtype)
    full_v = torch.randn_like(full_k)
    cases = {
        "ahn_window": (lambda: decode.cache_attention(q, keys, values, slot_pos, cursor, S, W), 2 * keys.numel() * 2),
        "full": (lambda: decode.decode_attention(q, full_k, full_v), 2 * full_k.numel() * 2),
    }
    rows = []
    for splits in (int(x) for x in args.splits.split(",")):
        decode.ATTENTION_SPLITS = splits
        for name, (call, byte_count) in cases.items():
            def step(call=call):
                for _ in range(args.layers):
                    call()
            us = graph_us(step, args.layers)
            rows.append({"case": name, "splits": splits, "us_per_call": us, "bytes_per_call": byte_count,
                         "bytes_per_s": byte_count / us * 1e6})
            print(f"attention {name:<11} splits {splits:>3}: {us:7.2f} us per call, "
                  f"{byte_count / us / 1e6:6.3f} TB/s", flush=True)
    decode.ATTENTION_SPLITS = 0
    return rows


if __name__ == "__main__":
    main()
