"""Time per new token of ``AHNForCausalLM.generate``: transformers' loop (eager steps) against
``cuda_graph=True`` (each step replayed from a CUDA graph), on a CUDA GPU.

The Qwen2.5-3B architecture with random weights (bf16), batch 8, a GDN memory with 128 sinks +
32,640 window, a prompt of ``--prompt`` tokens, greedy. Per mode: generate 1 token and 1 + N tokens
from a fresh cache; the difference over N is the decode time per token (prefill cancels). Also says
whether both modes produced the same tokens.

    python benchmarks/generate_speed.py --json benchmarks/results/generate_speed_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
import transformers
from ahn_decode import DEV, QWEN25_3B, TINY, ahn_model, compile_memory, compile_pointwise
from transformers import Qwen2Config, Qwen2ForCausalLM


def timed_generate(model, ids: torch.Tensor, new: int, cuda_graph: bool) -> tuple[float, torch.Tensor]:
    """Seconds of one generate call of ``new`` tokens from a fresh cache, and its output."""
    if DEV == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=0, eos_token_id=None, cuda_graph=cuda_graph)
    if DEV == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new", type=int, default=64, help="N: tokens timed beyond the first")
    parser.add_argument("--window", type=int, default=32640)
    parser.add_argument("--sinks", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="torch.compile the pointwise parts (as ahn_decode.py)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU (eager only), to check the script")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    arch = QWEN25_3B
    if args.tiny:
        arch, args.prompt, args.new, args.window, args.sinks = TINY, 40, 4, 16, 2
    torch.manual_seed(0)
    with torch.device(DEV):
        base = Qwen2ForCausalLM(Qwen2Config(**arch)).to(torch.bfloat16 if DEV == "cuda" else torch.float32).eval()
    base.requires_grad_(False)
    model = ahn_model(base, args.window, args.sinks)
    if args.compile:
        compile_pointwise(model.base)
        compile_memory(model)
    ids = torch.randint(1, arch["vocab_size"], (args.batch, args.prompt), device=DEV)
    rows, outputs = [], {}
    for cuda_graph in ([False, True] if DEV == "cuda" else [False]):
        timed_generate(model, ids[:, :64], 4, cuda_graph)  # warm-up: compiles, autotunes, the allocator
        t1, _ = timed_generate(model, ids, 1, cuda_graph)
        tn, outputs[cuda_graph] = timed_generate(model, ids, 1 + args.new, cuda_graph)
        ms = (tn - t1) / args.new * 1e3
        rows.append({"cuda_graph": cuda_graph, "ms_per_token": ms, "tokens_per_s": args.batch * 1e3 / ms,
                     "seconds_1_token": t1, f"seconds_{1 + args.new}_tokens": tn})
        print(f"cuda_graph={cuda_graph!s:5}: {ms:8.2f} ms per new token (batch {args.batch}), "
              f"{args.batch * 1e3 / ms:8.1f} tok/s; prefill + 1 token {t1:.2f} s")
    same = torch.equal(outputs[False], outputs[True]) if len(outputs) == 2 else None  # None: one mode ran
    print("same tokens:", "n/a (one mode)" if same is None else same)
    meta = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
            "model": "Qwen2.5-3B architecture, random weights, bf16" if not args.tiny else "tiny, float32",
            "memory": "gdn", "batch": args.batch, "prompt": args.prompt, "new_tokens_timed": args.new,
            "window": args.window, "sinks": args.sinks, "compiled_pointwise": args.compile,
            "same_tokens": same}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
