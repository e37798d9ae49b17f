"""AHN decoding through the decode kernels (the cached memory steps, the cache write, attention over
the cache) equals one full forward, for each memory type. Run by test_decode_ops.py (on CUDA, or
under TRITON_INTERPRET=1 on CPU tensors), or directly: ``python tests/ahn_kernel_cases.py``."""

from __future__ import annotations

import sys

import torch
from test_ahn import with_random_memory
from transformers import LlamaConfig, LlamaForCausalLM

from hippolm import AHNForCausalLM
from hippolm.ops import decode

# head dim 32: one the kernels take (the other tests' tiny models use 16)
CONFIG = dict(vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024)


def ahn_decode_cases(device: str) -> list[str]:
    """Failures (empty: none) of AHN decoding through the kernels against one full forward."""
    names = ("_memory_step_cache_kernel", "_loglinear_step_cache_kernel")
    kernels, count = {name: getattr(decode, name) for name in names}, {"n": 0}

    class Counted:  # a kernel's launches counted: the decode really ran through the kernels
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            count["n"] += 1
            return self.kernel[grid]

    failures = []
    try:
        for name, kernel in kernels.items():
            setattr(decode, name, Counted(kernel))
        for memory in ("gdn", "deltanet", "mamba2", "loglinear_gdn"):
            torch.manual_seed(0)
            base = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
            model = with_random_memory(AHNForCausalLM.from_base(base, memory, window=8, sinks=2)).to(device)
            ids = torch.randint(0, 97, (3, 30), device=device)
            before = count["n"]
            with torch.no_grad():
                full = model(ids).logits
                cache = model.new_cache()
                model.prefill(ids[:, :16], cache=cache)
                steps = torch.cat([model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(16, 30)], 1)
            err = (steps - full[:, 16:]).abs().max().item()
            launched = count["n"] - before
            if err > 1e-4 or launched != 14 * CONFIG["num_hidden_layers"]:
                failures.append(f"{memory}: max |decode - full| {err:.2e}, {launched} memory step launches")
    finally:
        for name, kernel in kernels.items():
            setattr(decode, name, kernel)
    return failures


if __name__ == "__main__":
    failures = ahn_decode_cases("cuda" if torch.cuda.is_available() else "cpu")
    print("\n".join(failures) or "AHN decode through the kernels equals the full forward")
    sys.exit(1 if failures else 0)
