"""Decode speed and cache bytes vs context: full attention vs AHN, on a CUDA GPU.

The real Qwen2.5-3B architecture with random weights (bf16), batch 8, AHN with 128 sinks +
32,640 window. Caches are filled with random keys/values for the context length (decode time
depends on cache size, not content), then decode steps are timed. On CUDA each step is replayed
from a CUDA graph for both models (transformers' StaticCache for full attention, hippolm's
GraphDecoder for AHN), as a serving stack would; ``--eager`` times plain eager steps instead.

    python benchmarks/ahn_decode.py --json benchmarks/results/ahn_decode_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
import transformers
from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM, StaticCache

from hippolm import AHNForCausalLM
from hippolm.hf_compat import cache_arg
from hippolm.ops.decode import decode_attention
from hippolm.ops.loglinear import occupied_levels

QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=131072 + 512,
                 rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def time_steps(step, n: int, warmup: int = 3) -> tuple[float, dict[str, float]]:
    """Median ms per step, each step timed alone (synchronised before and after), and the medians of
    where it goes: "enqueue_ms", the host's time to launch the step (until ``step`` returns), and on
    CUDA "gpu_ms", between events recorded just before and after it (the GPU's span of the step,
    including any wait for the host's launches). A step time well above gpu_ms is spent in the sync;
    a gpu_ms well above the kernels' sum, in the GPU waiting for the host or idle between kernels."""
    for _ in range(warmup):
        step()
    times, enqueue, gpu = [], [], []
    cuda = DEV == "cuda"
    for _ in range(n):
        if cuda:
            torch.cuda.synchronize()
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record()
        start = time.perf_counter()
        step()
        enqueue.append((time.perf_counter() - start) * 1e3)
        if cuda:
            after.record()
            torch.cuda.synchronize()
            gpu.append(before.elapsed_time(after))
        times.append((time.perf_counter() - start) * 1e3)
    split = {"enqueue_ms": statistics.median(enqueue)} | ({"gpu_ms": statistics.median(gpu)} if gpu else {})
    return statistics.median(times), split


def kernel_table(step, n: int = 5, top: int = 30) -> dict[str, float]:
    """GPU time per step of each kernel (name truncated to 90 characters), from the profiler over
    ``n`` steps, the ``top`` largest in descending order, plus their total ("all kernels"), the
    kernels launched per step ("launches") and the idle GPU time before each kernel ("gaps": per
    name, the time since the previous kernel ended, within a step), which says where a step's time
    between kernels goes."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    kernels = [(e.name[:90], e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    sums, gaps = kernel_times(kernels, n)
    table = dict(sorted(sums.items(), key=lambda kv: -kv[1])[:top])
    table["all kernels"] = sum(sums.values())
    table["launches"] = len(kernels) / n
    table["gaps"] = dict(sorted(gaps.items(), key=lambda kv: -kv[1])[:15]) | {"all gaps": sum(gaps.values())}
    return table


def kernel_times(kernels: list[tuple[str, float, float]], n: int) -> tuple[dict[str, float], dict[str, float]]:
    """Per kernel name, ms per step of its runs and of the idle time before them (since the previous
    kernel ended; gaps over 200 us lie between steps, where the host synchronises), from (name,
    start us, end us) of ``n`` steps."""
    sums: dict[str, float] = {}
    gaps: dict[str, float] = {}
    end = None
    for name, start, stop in sorted(kernels, key=lambda k: k[1]):
        sums[name] = sums.get(name, 0.0) + (stop - start) / 1e3 / n
        if end is not None and 0 < start - end < 200:
            gaps[name] = gaps.get(name, 0.0) + (start - end) / 1e3 / n
        end = stop if end is None else max(end, stop)
    return sums, gaps


def add_kernel_table(row: dict, table: dict) -> None:
    """A profiled row's kernel_table() entries, under the row's keys."""
    row["kernel_launches_per_step"] = table.pop("launches")
    row["kernel_gap_ms_per_step"] = table.pop("gaps")
    row["kernel_ms_per_step"] = table


def graphed(step, advance):
    """``step`` captured in a CUDA graph after a warm-up on a side stream; ``advance`` moves the
    static position inputs on (outside the graph) before each replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        advance()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def replay():
        graph.replay()
        advance()

    return replay


def full_decode_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Full attention for the benchmark's decode steps with hippolm's split-KV decode kernel (the one
    AHN uses), so both models differ only in what they read: every slot of the exactly-sized static
    cache holds a real token, so the mask is all-true and skipped."""
    out = decode_attention(query[:, :, 0], key, value, scaling)
    return out[:, None], None


AttentionInterface.register("hippolm_full_decode", full_decode_attention)


def full_attention(model, B: int, L: int, n: int, use_graph: bool, kernel: bool,
                   profiled: bool = False) -> tuple[float, dict[str, float], int, dict | None]:
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    # kernel: a cache of exactly L tokens whose last slot each step rewrites (same bytes read as a
    # context of L); sdpa: transformers' own path, a static cache with a mask.
    cache = StaticCache(config=cfg, max_cache_len=L if kernel else L + n + 16)
    kv = torch.randn(B, cfg.num_key_value_heads, L, d, device=DEV, dtype=model.dtype)
    for i in range(cfg.num_hidden_layers):
        cache.update(kv, kv, i)
    del kv
    ids = torch.zeros(B, 1, dtype=torch.long, device=DEV)
    start = L - 1 if kernel else L
    cache_position = torch.full((1,), start, dtype=torch.long, device=DEV)
    position_ids = torch.full((B, 1), start, dtype=torch.long, device=DEV)

    lengths = [layer.cumulative_length for layer in cache.layers if hasattr(layer, "cumulative_length")]

    def step():
        if kernel:  # newer transformers track the write position in the cache itself
            for t in lengths:
                t.fill_(start)
        model(input_ids=ids, **cache_arg(cache), position_ids=position_ids, cache_position=cache_position,
              use_cache=True, logits_to_keep=1)

    def advance():
        if not kernel:
            cache_position.add_(1)
            position_ids.add_(1)

    if use_graph:
        run = graphed(step, advance)
    else:
        def run():
            step()
            advance()
    ms, split = time_steps(run, n)
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return ms, split, kv_bytes, kernel_table(run) if profiled else None


def compile_pointwise(base) -> None:
    """torch.compile the parts of each decoder layer that are chains of small pointwise kernels
    (norms, MLP, rotary embedding), identically for both models: at batch 8 a decode step is
    otherwise dominated by ~40 kernel launches per layer rather than by the bytes it reads."""
    import sys

    decoder = base.get_decoder()
    for layer in decoder.layers:
        layer.mlp.forward = torch.compile(layer.mlp.forward, dynamic=False)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.forward = torch.compile(norm.forward, dynamic=False)
    decoder.norm.forward = torch.compile(decoder.norm.forward, dynamic=False)
    decoder.rotary_emb.forward = torch.compile(decoder.rotary_emb.forward, dynamic=False)
    modeling = sys.modules[type(decoder.layers[0].self_attn).__module__]
    modeling.apply_rotary_pos_emb = torch.compile(modeling.apply_rotary_pos_emb, dynamic=False)


def compile_memory(model: AHNForCausalLM) -> None:
    """The memory's own pointwise chains (gates, read-out projection), compiled likewise."""
    for layer in model.base.get_decoder().layers:
        mem = layer.self_attn.ahn
        for name in ("write_gates", "read_gates"):
            setattr(mem, name, torch.compile(getattr(mem, name), dynamic=False))


def ahn_model(base, window: int, sinks: int, memory: str = "gdn") -> AHNForCausalLM:
    return AHNForCausalLM.from_base(base, memory, window=window, sinks=sinks)


def ahn_decode(model: AHNForCausalLM, B: int, L: int, n: int, use_graph: bool,
               profiled: bool = False) -> tuple[float, dict[str, float], int, int, float | None, dict | None]:
    cache = model.new_cache()
    ids = torch.zeros(B, 1, dtype=torch.long, device=DEV)
    model(ids, cache=cache)  # allocates every layer's buffers
    S, W = cache.sinks, cache.window
    for layer in cache.layers:  # pretend L tokens went through: buffers full, memory non-empty
        layer.keys.normal_()
        layer.values.normal_()
        getattr(layer.memory, "slots", layer.memory).normal_(0, 0.01)  # a log-linear memory: its level slots
        if hasattr(layer.memory, "position"):  # the tokens written so far
            layer.memory.position.fill_(max(0, L - W - S))
        ring = torch.arange(L - W, L, device=DEV) if L >= W else torch.arange(L, device=DEV)
        layer.slot_pos[:, :S] = torch.arange(S, device=DEV)
        layer.slot_pos[:, S + ring % W] = ring.to(layer.slot_pos.dtype)
        layer.stream_len = L
        layer.real_seen.fill_(L)
        layer.cursor.fill_(L)
        layer.all_visible = L >= W + S
    if use_graph:  # a graph per kind of step: window filling (L < W + S) or full
        decoder = model.graph_decoder(cache)

        def step():
            decoder(ids)
    else:
        def step():
            p = cache.layers[0].real_seen[:, None]
            model(ids, cache=cache, position_ids=p, logits_to_keep=1)

    memory = cache.layers[0].memory
    first = int(memory.position[0]) if hasattr(memory, "position") else None
    ms, split = time_steps(step, n)
    # bytes a step reads: while the window fills, the attention reads only the filled slots
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    read = cache.nbytes() - kv + kv * (S + min(L, W)) / (S + W)
    levels = None
    if first is not None:  # a log-linear step reads only the occupied level slots of the positions it ran at
        visited = torch.arange(first, int(memory.position[0]))
        levels = float(occupied_levels(visited, memory.num_levels).sum(-1).double().mean())
        slot_bytes = sum(layer.memory.slots.numel() * layer.memory.slots.element_size() for layer in cache.layers)
        read -= slot_bytes * (1 - levels / memory.num_levels)
    return ms, split, cache.nbytes(), read, levels, kernel_table(step) if profiled else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", default="8192,16384,32768,65536,131072")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=32640)
    parser.add_argument("--sinks", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--memory", default="gdn", help="the AHN memory (gdn, loglinear_gdn, ...)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU, to check the script")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the pointwise parts of every layer (both models alike)")
    parser.add_argument("--baseline", choices=["kernel", "sdpa"], default="kernel",
                        help="full attention's decode attention: hippolm's split-KV kernel, or transformers' SDPA path")
    parser.add_argument("--profile", type=int, default=None, metavar="CONTEXT",
                        help="at this context also record each model's GPU time per kernel (profiler)")
    args = parser.parse_args()
    arch = QWEN25_3B
    if args.tiny:
        arch, args.contexts, args.window, args.sinks, args.steps = TINY, "64,256", 32, 4, 2
    use_graph = DEV == "cuda" and not args.eager
    torch.manual_seed(0)
    with torch.device(DEV):
        base = Qwen2ForCausalLM(Qwen2Config(**arch)).to(torch.bfloat16 if DEV == "cuda" else torch.float32).eval()
    base.requires_grad_(False)  # as after conversion: compiled code is not re-specialised for it
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    rows = []
    meta = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": datetime.date.today().isoformat(), "model": "Qwen2.5-3B architecture, random weights, bf16",
            "batch": args.batch, "window": args.window, "sinks": args.sinks, "weight_bytes": weight_bytes,
            "full_attention_kernel": args.baseline, "compiled_pointwise": args.compile,
            "mode": "eager" if not use_graph
            else "CUDA graph per decode step (AHN: one for window-filling steps, one for window-full steps)"}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": rows}, f, indent=2)

    contexts = [int(c) for c in args.contexts.split(",")]
    profiled = {args.profile} if DEV == "cuda" else set()
    if args.baseline == "kernel":
        base.config._attn_implementation = "hippolm_full_decode"
    if args.compile:
        compile_pointwise(base)
    with torch.no_grad():
        for L in contexts:
            ms, split, kv, kernels = full_attention(base, args.batch, L, args.steps, use_graph,
                                                    args.baseline == "kernel", L in profiled)
            rows.append({"context": L, "model": "full_attention", "ms_per_step": ms,
                         "tokens_per_s": args.batch / ms * 1e3, "cache_bytes": kv,
                         "bytes_per_s": (weight_bytes + kv) / ms * 1e3, "step_split": split})
            if kernels:
                add_kernel_table(rows[-1], kernels)
            save()
        model = ahn_model(base, args.window, args.sinks, args.memory)
        if args.compile:
            compile_memory(model)
        for L in contexts:
            ms, split, cb, read, levels, kernels = ahn_decode(model, args.batch, L, args.steps, use_graph,
                                                              L in profiled)
            rows.append({"context": L, "model": f"ahn_{args.memory}", "ms_per_step": ms,
                         "tokens_per_s": args.batch / ms * 1e3, "cache_bytes": cb,
                         "bytes_per_s": (weight_bytes + read) / ms * 1e3, "step_split": split})
            if levels is not None:  # the mean number of level slots read per step (log-linear memories)
                rows[-1]["levels_read"] = levels
            if kernels:
                add_kernel_table(rows[-1], kernels)
            save()
    print(json.dumps(meta))
    print(f"{'context':>8} {'model':<16}{'ms/step':>9}{'gpu ms':>8}{'launch ms':>10}{'tok/s':>9}{'cache GB':>10}"
          f"{'TB/s':>7}")
    for r in rows:
        split = r["step_split"]
        print(f"{r['context']:>8} {r['model']:<16}{r['ms_per_step']:>9.2f}{split.get('gpu_ms', float('nan')):>8.2f}"
              f"{split['enqueue_ms']:>10.3f}{r['tokens_per_s']:>9.0f}{r['cache_bytes'] / 1e9:>10.2f}"
              f"{r['bytes_per_s'] / 1e12:>7.2f}"
              + (f"  levels read {r['levels_read']:.1f}" if "levels_read" in r else ""))
    for r in rows:
        for name, t in r.get("kernel_ms_per_step", {}).items():
            print(f"{r['model']:<16}{t:>8.3f} ms  {name}")
        if "kernel_launches_per_step" in r:
            print(f"{r['model']:<16}{r['kernel_launches_per_step']:>8.0f} kernel launches per step")
        for name, t in r.get("kernel_gap_ms_per_step", {}).items():
            print(f"{r['model']:<16}{t:>8.3f} ms idle before  {name}")


if __name__ == "__main__":
    main()
