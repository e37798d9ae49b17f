"""Prefill time by chunk size on CPU: the built-in model (SmolLM2-135M) with a new GDN memory, the
default window 2048, 4096 random tokens, 2 threads (CI's cores). Why AHNForCausalLM.prefill cuts
chunks longer than the window: a chunk attends to itself and the window.

    python benchmarks/prefill_chunk_cpu.py --json benchmarks/results/prefill_chunk_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

import hippolm
from hippolm.hf_compat import cache_arg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunks", default="4096,2048,1024,512,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = hippolm.AHNForCausalLM.from_base("builtin", memory="gdn").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    window = model.ahn_config.window
    rows = []
    for chunk in map(int, args.chunks.split(",")):
        t = time.perf_counter()
        _uncut_prefill(model, ids, chunk)
        rows.append({"chunk": chunk, "seconds": round(time.perf_counter() - t, 2)})
        print(rows[-1], flush=True)
    if args.json:
        meta = {"device": f"cpu ({platform.processor() or platform.machine()})", "threads": args.threads,
                "torch": torch.__version__, "date": datetime.date.today().isoformat(), "tokens": args.tokens,
                "window": window, "model": "builtin (SmolLM2-135M-Instruct), new gdn memory, float32"}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


@torch.no_grad()
def _uncut_prefill(model, ids, chunk):
    """prefill's loop without its cut to the window (each chunk size as asked)."""
    cache = model.new_cache()
    positions = torch.arange(ids.shape[1])[None]
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        model.base.get_decoder()(input_ids=ids[:, start:end], attention_mask=torch.ones_like(ids[:, :end]),
                                 position_ids=positions[:, start:end], **cache_arg(cache), use_cache=True)
    return cache


if __name__ == "__main__":
    main()
