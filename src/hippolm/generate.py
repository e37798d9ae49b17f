"""``hippolm generate``: text from a prompt with full attention, SWA-only or an AHN memory.

    hippolm generate "Tell me about Paris."                       # built-in base, full attention
    hippolm generate --prompt-file long.txt --memory runs/x/memory  # base + trained memory
    hippolm generate --prompt-file long.txt --window 512 --sinks 64  # sinks + sliding window only

Prints the generated text (streamed) on stdout, then on stderr the prompt and generated tokens,
speed, the bytes the cache really holds, and what a full-attention KV cache would hold at the
same length.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .ahn.config import MEMORY_TYPES
from .hf_compat import cache_arg
from .runtime import pick_device, pick_dtype


class GenerateError(Exception):
    """A problem the user can fix: one message, exit code 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (or --prompt-file)")
    p.add_argument("--prompt-file", help="read the prompt from this file ('-': standard input)")
    p.add_argument("--base", default="builtin", help="base causal LM: hub id, local folder or 'builtin' "
                   "(SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", help="tokenizer (default: the base's)")
    p.add_argument("--memory", help="a memory folder (from hippolm distill: RUN/memory) or a memory type "
                   f"({', '.join(MEMORY_TYPES)}: a fresh memory reads nothing, i.e. SWA-only). Default: full "
                   "attention, or SWA-only if --window is given")
    p.add_argument("--window", type=int, help="tokens of the sliding window (default: the memory's)")
    p.add_argument("--sinks", type=int, help="attention-sink tokens (default: the memory's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="feed the prompt as is (default: the chat template "
                   "when the tokenizer has one)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--prefill-chunk", type=int, default=4096, help="prompt tokens per prefill forward (AHN)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end, not as it comes")
    p.add_argument("--cuda-graph", action="store_true", help="AHN / SWA-only on CUDA: each new token from a "
                   "replayed CUDA graph (generate(cuda_graph=True)), not transformers' loop")


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    cache_bytes: int
    full_kv_bytes: int  # what full attention would hold for the same tokens (analytic)
    mode: str


def cache_nbytes(cache) -> int:
    """Bytes of every tensor a cache holds (an AHN cache or a transformers KV cache)."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def full_kv_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """KV bytes of full attention over ``tokens`` tokens (:func:`hippolm.accounting.full_cache_bytes`)."""
    from .accounting import full_cache_bytes, shape_of

    return full_cache_bytes(shape_of(config), tokens, kv_bytes=torch.finfo(dtype).bits // 8).total


def load(base: str, memory: str | None, window: int | None, sinks: int | None, device: torch.device,
         dtype: torch.dtype, tokenizer: str | None = None):
    """``(tokenizer, model, mode)``: model an :class:`AHNForCausalLM` (mode ``ahn`` or ``swa``) or the
    plain base (mode ``full``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .ahn import AHNForCausalLM
    from .builtin import BuiltinError, resolve_base

    try:
        path = resolve_base(base)
        tok = AutoTokenizer.from_pretrained(resolve_base(tokenizer) if tokenizer else path)
    except BuiltinError as e:
        raise GenerateError(str(e)) from e
    except (OSError, ValueError) as e:
        raise GenerateError(f"cannot load {tokenizer or base!r}: {e}") from e
    if memory is None and window is None:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        except (OSError, ValueError) as e:
            raise GenerateError(f"cannot load the base model {base!r}: {e}") from e
        return tok, model, "full"
    memory = memory or "gdn"
    if memory not in MEMORY_TYPES and not Path(memory).is_dir():
        raise GenerateError(f"--memory {memory!r} is neither a memory type ({', '.join(MEMORY_TYPES)}) nor a folder.")
    try:
        model = AHNForCausalLM.from_base(path, memory, window=window, sinks=sinks, dtype=dtype, device=device,
                                         memory_dtype=torch.float32 if device.type == "cpu" else None)
    except (OSError, ValueError) as e:
        raise GenerateError(f"cannot load {base!r} with memory {memory!r}: {e}") from e
    model.ahn_config.base_model = str(base)
    tok.model_max_length = 1 << 62  # the bounded cache reads any length: no "longer than the maximum" warning
    return tok, model.eval(), ("swa" if memory in MEMORY_TYPES else "ahn")


def encode_prompt(tokenizer, prompt: str, raw: bool = False) -> torch.Tensor:
    """``[1, T]`` ids: through the chat template unless ``raw`` or the tokenizer has none."""
    if not raw and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate(model, tokenizer, input_ids: torch.Tensor, mode: str, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, prefill_chunk: int = 4096, streamer=None,
             cuda_graph: bool = False) -> Generation:
    """Generate from ``input_ids`` [1, T] and measure the cache the model kept."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = input_ids.to(device)
    sample = temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, streamer=streamer,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    t0 = time.perf_counter()
    if mode == "full":
        cache = DynamicCache(config=model.config)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_arg(cache), **kwargs)
    else:
        cache = model.new_cache()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             prefill_chunk_size=prefill_chunk, cuda_graph=cuda_graph, prefill_progress=True, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    return Generation(text=tokenizer.decode(new, skip_special_tokens=True), prompt_tokens=ids.shape[1],
                      new_tokens=int(new.numel()), seconds=seconds, cache_bytes=cache_nbytes(cache),
                      full_kv_bytes=full_kv_bytes(model.config, ids.shape[1] + int(new.numel()), dtype), mode=mode)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def run(args: argparse.Namespace) -> int:
    if args.prompt_file:
        prompt = sys.stdin.read() if args.prompt_file == "-" else _read(args.prompt_file)
        if args.prompt:
            prompt = f"{prompt}\n\n{args.prompt}"  # a document, then the question about it
    elif args.prompt:
        prompt = args.prompt
    else:
        raise GenerateError("give a prompt, or --prompt-file FILE.")
    if args.max_new_tokens < 1:
        raise GenerateError("--max-new-tokens must be >= 1.")
    if args.memory is None and args.window is None and args.sinks is not None:
        raise GenerateError("--sinks sets the sinks of SWA-only (with --window) or of a memory (with --memory); "
                            "give one of them too.")
    from transformers import TextStreamer

    torch.manual_seed(args.seed)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    dtype = pick_dtype(args.dtype, device)
    if args.cuda_graph and device.type != "cuda":
        raise GenerateError(f"--cuda-graph needs a CUDA device (this run is on {device}); leave it out on CPU.")
    tokenizer, model, mode = load(args.base, args.memory, args.window, args.sinks, device, dtype, args.tokenizer)
    if args.cuda_graph and mode == "full":
        raise GenerateError("--cuda-graph decodes through the AHN cache: give --memory or --window.")
    ids = encode_prompt(tokenizer, prompt, args.raw)
    streamer = None if args.no_stream else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    g = generate(model, tokenizer, ids, mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_p=args.top_p, prefill_chunk=args.prefill_chunk, streamer=streamer, cuda_graph=args.cuda_graph)
    if args.no_stream:
        print(g.text)
    if mode == "full":
        what = "full attention (KV of every token)"
    else:
        c = model.ahn_config
        what = f"{'SWA-only' if mode == 'swa' else c.memory + ' memory'} + sinks {c.sinks} + window {c.window}"
    print(f"\n[generate] {what}: prompt {g.prompt_tokens:,} tokens, generated {g.new_tokens} in {g.seconds:.1f} s "
          f"({g.new_tokens / max(g.seconds, 1e-9):.1f} tok/s incl. prefill) on {device}, {dtype}", file=sys.stderr)
    print(f"[generate] cache held: {human_bytes(g.cache_bytes)}; full attention at {g.prompt_tokens + g.new_tokens:,} "
          f"tokens: {human_bytes(g.full_kv_bytes)} (KV, analytic)", file=sys.stderr)
    return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise GenerateError(f"cannot read --prompt-file {path}: {e}") from e


def main(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except GenerateError as e:
        print(f"hippolm generate: error: {e}", file=sys.stderr)
        return 2
