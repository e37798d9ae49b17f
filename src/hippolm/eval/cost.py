"""Measured peak GPU memory of full attention vs AHN (``hippolm cost --measure``).

The model is built from its config with random weights directly on the GPU (memory does not
depend on the weights' values), converted to AHN, and for each system a ``context``-token prompt
is prefilled in chunks through the bounded cache and one token is decoded, as
:meth:`~hippolm.ahn.AHNForCausalLM.generate` runs it. Reported per system: the peak allocated
above the weights (``torch.cuda.max_memory_allocated``) and what the cache holds afterwards.
Full attention is the same model with a window covering the whole context (nothing evicted).
"""

from __future__ import annotations

import gc

import torch


def build_model(base, memory: str = "gdn", window: int = 32640, sinks: int = 128, dtype=torch.bfloat16,
                device: str | torch.device = "cuda"):
    """An :class:`~hippolm.ahn.AHNForCausalLM` with random weights from ``base``'s config alone."""
    from transformers import AutoModelForCausalLM

    from ..accounting import load_config
    from ..ahn import AHNForCausalLM

    config = load_config(base) if isinstance(base, str) else base
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return AHNForCausalLM.from_base(model.eval(), memory, window=window, sinks=sinks)


@torch.no_grad()
def run_system(model, ids: torch.Tensor, window: int, sinks: int, chunk_size: int = 4096):
    """Prefill ``ids[:, :-1]`` through a fresh cache and decode one token; returns the cache."""
    cache = model.new_cache(window=window, sinks=sinks)
    model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False, prefill_chunk_size=chunk_size,
                   pad_token_id=0)
    return cache


def measure_peak_memory(base, *, window: int, sinks: int, memory: str = "gdn", context: int = 131072,
                        dtype=torch.bfloat16, chunk_size: int = 4096, device: str | torch.device = "cuda",
                        model=None) -> dict:
    """Peak and cache bytes per system (``full``, ``ahn``) on a CUDA device; raises on CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("measuring peak memory needs a CUDA device (torch.cuda.max_memory_allocated).")
    if model is None:
        model = build_model(base, memory, window, sinks, dtype, device)
    weights = torch.cuda.memory_allocated(device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (1, context), generator=gen).to(device)
    out = {"device": torch.cuda.get_device_name(device), "dtype": str(dtype).removeprefix("torch."),
           "context": context, "chunk_size": chunk_size, "weights_bytes": weights}
    for name, (win, snk) in (("full", (context + 1, 0)), ("ahn", (window, sinks))):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        cache = run_system(model, ids, win, snk, chunk_size)
        torch.cuda.synchronize(device)
        out[name] = {"peak_bytes": torch.cuda.max_memory_allocated(device) - start,
                     "cache_bytes": torch.cuda.memory_allocated(device) - start}
        del cache
    out["ratios"] = {k: out["ahn"][k] / out["full"][k] if out["full"][k] else float("nan")
                     for k in ("peak_bytes", "cache_bytes")}
    return out


def format_measured(m: dict) -> str:
    def gib(x: int) -> str:
        return f"{x / 2**30:,.2f} GiB"

    w = (44, 16, 16, 10)
    lines = [f"measured on {m['device']} ({m['dtype']}, random weights, prefill in chunks of {m['chunk_size']}, "
             f"then 1 decoded token), weights {gib(m['weights_bytes'])}:",
             f"{'':<{w[0]}}{'full attention':>{w[1]}}{'AHN':>{w[2]}}{'AHN/full':>{w[3]}}"]
    for key, label in (("peak_bytes", "peak memory above the weights"), ("cache_bytes", "cache after decoding")):
        lines.append(f"{label:<{w[0]}}{gib(m['full'][key]):>{w[1]}}{gib(m['ahn'][key]):>{w[2]}}"
                     f"{100 * m['ratios'][key]:>{w[3] - 1}.1f}%")
    return "\n".join(lines)
