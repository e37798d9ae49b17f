"""Analytic cost of full attention vs AHN (sinks + sliding window + recurrent memory) from a model config.

Everything here is computed from a transformers ``PretrainedConfig`` (Llama, Mistral, Qwen2/2.5,
Qwen3 families) alone: no weights, no device. ``hippolm cost`` prints it (:func:`cost_main`).

Conventions
-----------
Counting
    * FLOPs = 2 x multiply-adds of matrix products (``FlopCounterMode``'s convention). Bias adds,
      norms, activations, rotary embedding, softmax, gate nonlinearities and the elementwise decay of
      the memory state are not counted (``FlopCounterMode`` ignores them too; each is O(hidden) or
      O(d^2) per head without a contraction). Embedding lookups cost nothing.
    * Linear layers per token and layer: q ``D*Hq*d``, k and v ``D*Hkv*d`` each, o ``Hq*d*D``,
      gated MLP ``3*D*I`` multiply-adds.
    * Attention: a query attending ``K`` keys costs ``2*Hq*d*K`` multiply-adds (``QK^T`` and ``AV``;
      GQA does not reduce it). ``causal=True`` (default) charges each query only for the keys it
      attends: query ``p`` (0-based) of a prefill sees ``min(p + 1, span)`` keys, ``span`` = the
      context for full attention and ``sinks + window`` for AHN, so causal prefill is about half
      the square. ``causal=False`` charges every query of a one-shot prefill for the whole key
      rectangle, ``n * min(n, span)``: what a kernel computing the masked entries does and what
      ``FlopCounterMode`` counts for eager / math SDPA attention (it ignores the mask).
    * LM head: ``D*V`` per position that gets logits. ``logits="last"`` (default, what our
      ``AHNForCausalLM`` prefill computes) charges it once per prefill; ``"all"`` charges it at
      every prompt position (a plain Hugging Face forward, and the paper's public code).
      A decoded token always pays it once.
    * Memory (AHN), per layer: gate projections ``D*H`` each (gdn: decay, write strength, output
      gate = 3; deltanet and mamba2: 2) plus ``D*H*levels`` for the log-linear level weights, and
      the block-diagonal read-out ``H*d^2``, for every token. Per memory step (a token leaving the
      window is written, then the query reads) and head: read ``L*d^2`` (``S^T q`` per level), write
      ``2*d^2`` for the delta rule (``S^T k`` and the rank-1 update) or ``d^2`` for Mamba-2
      (``k v^T``); log-linear GDN applies the delta correction to every level in use:
      ``2*(L-1)*d^2 + d^2``. ``L`` = 1, or for log-linear memories ``ceil(log2 m) + 1`` (capped at
      ``levels``) with ``m`` tokens in memory. This is the recurrent form; the chunked training
      kernels do a few more multiply-adds per token (intra-chunk terms), not counted.
    * Decode "at context n": ``n`` tokens are already cached; the new token attends ``n + 1`` keys
      (full) or ``min(n + 1, sinks + window)`` (AHN) and, once ``n >= sinks + window``, the token
      leaving the window is written into the memory and read.

Window semantics are those of :mod:`hippolm.ahn`: each layer keeps ``sinks`` first tokens and the
last ``window`` tokens (the current one included), ``sinks + window`` tokens losslessly.

Cache bytes (per sequence)
    * Full attention: ``2 * layers * n * Hkv * d`` KV entries at ``kv_bytes`` (default 2, bf16).
    * AHN, as our :class:`~hippolm.ahn.AHNCache` holds it: KV of ``min(n, sinks + window)`` tokens,
      the fp32 memory state ``H * d * d`` per layer (``levels`` of them for log-linear memories,
      allocated up front), the write gates of the window tokens (``window * H * G``, G = 2 for gdn /
      mamba2, 1 for deltanet) stored in the KV dtype, and an int32 position per lossless slot. Our cache allocates the
      ``sinks + window`` buffers on the first token; ``preallocated=True`` reports that.

Parameters
    Base: embeddings, (untied) LM head, q/k/v/o (Qwen2: q/k/v biases; Llama/Qwen3: ``attention_bias``),
    MLP, RMSNorms (Qwen3: q/k norms). Memory per layer, as :class:`hippolm.ahn.memory.MemoryModule`:
    gdn ``3*D*H + H*d^2 + 2*H + d``, deltanet ``2*D*H + H*d^2 + d``, mamba2 ``2*D*H + H*d^2 + 2*H + d``,
    log-linear adds ``D*H*levels + H*levels``. For Qwen2.5-3B: 12.98M / 11.80M / 11.80M (paper:
    13.0M / 11.8M / 11.9M; the paper's Mamba-2 normalises over all heads, ``H*d`` norm weights,
    +0.07M); 7B: 21.28M / 18.47M / 18.47M (paper: 21.3M / 18.5M / 18.6M).

The paper's Qwen2.5-3B-Instruct figures (128 sinks + 32640 window, "128k")
    * Cache -74.0% is reproduced exactly: at ``n = 128,000`` tokens (the "128k" of its evaluation
      scripts, ``MAX_INPUT_LENGTH=128000``) with the state counted in KV elements (same dtype):
      ``(2*32768*2*128 + 16*128^2) / (2*128000*2*128) = 17,039,360 / 65,536,000 = 0.2600`` exactly.
      Other readings give 74.6% (n = 131,072, same dtype), 74.2% (131,072, fp32 state), 73.6%
      (128,000, fp32 state). What our cache really holds at 131,072 (fp32 state plus bf16 write
      gates and int32 slot positions) is 27.4% of full attention: -72.6%, as measured on the GPU.
    * FLOPs -40.5% is not reproduced exactly by any consistent analytic convention we found. It is
      a whole-sequence figure: per decoded token at 128k the reduction is -63.8% (n = 128,000) or
      -64.5% (131,072). Prefilling 128,000 tokens (causal, logits at every position as the paper's
      public code computes them, our GDN memory costs) gives -41.4%; with logits at the last
      position only, -42.5%; at 131,072 tokens -42.4% / -43.4%. The difference, exactly: for
      AHN/full = 0.595 at n = 128,000 (logits everywhere) the AHN side would have to cost 30.2
      TFLOPs (1.6%) more, i.e. 317 MFLOPs more per compressed token, 3.5x what our memory costs
      per compressed token (91.5 MFLOPs, gates and read-out of every token included); or both
      sides 2 x 3.377B FLOPs per token outside attention instead of 2 x 3.086B (+9.4%). The
      closest single convention is to also charge the embedding lookup as a one-hot matmul
      (Chinchilla's appendix F), -40.44%, which rounds to 40.4%, not 40.5%. Without our memory's
      costs that convention gives -40.70%, so the paper's memory cost lies between zero and ours.
      See :func:`paper_reproduction`.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

from .ahn.config import MEMORY_TYPES, validate_window
from .builtin import BuiltinError, is_builtin, resolve_base

KV_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1}
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
CONFIG_DIR = Path(__file__).parent / "configs"
# Names that resolve to the configs shipped in hippolm/configs (no download).
KNOWN_BASES = {
    "qwen2.5-3b": "qwen2.5-3b-instruct.json",
    "qwen2.5-3b-instruct": "qwen2.5-3b-instruct.json",
    "qwen/qwen2.5-3b-instruct": "qwen2.5-3b-instruct.json",
    "qwen/qwen2.5-3b": "qwen2.5-3b-instruct.json",
    "qwen2.5-7b": "qwen2.5-7b-instruct.json",
    "qwen2.5-7b-instruct": "qwen2.5-7b-instruct.json",
    "qwen/qwen2.5-7b-instruct": "qwen2.5-7b-instruct.json",
    "qwen/qwen2.5-7b": "qwen2.5-7b-instruct.json",
}
PAPER = {"sinks": 128, "window": 32640, "context": 128_000, "cache_reduction": 0.740, "flops_reduction": 0.405}
# The memory's write gates per token and head (what AHNLayerCache.ring_gates holds, in the KV dtype).
_WRITE_GATES = {"gdn": 2, "mamba2": 2, "deltanet": 1}
_GATE_PROJECTIONS = {"gdn": 3, "mamba2": 2, "deltanet": 2}


# ----------------------------------------------------------------------------------------------
# Model shape


@dataclass(frozen=True)
class ModelShape:
    """What the accounting reads from a config."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    name: str = ""

    @classmethod
    def from_config(cls, config, name: str = "") -> ModelShape:
        model_type = getattr(config, "model_type", "")
        for attr in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
            if not isinstance(getattr(config, attr, None), int):
                raise ValueError(f"config of {model_type or type(config).__name__} has no integer {attr}: hippolm cost "
                                 f"handles dense decoder configs ({', '.join(SUPPORTED_FAMILIES)} families).")
        if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
            raise ValueError(f"{model_type} is a mixture-of-experts config; hippolm cost handles dense decoders only.")
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        qwen2 = model_type == "qwen2"  # Qwen2 attention: q/k/v biases, no o bias, regardless of config
        return cls(model_type=model_type, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                   vocab_size=config.vocab_size,
                   tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   qkv_bias=qwen2 or attention_bias, o_bias=attention_bias and not qwen2,
                   mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=model_type == "qwen3",
                   name=name or getattr(config, "_name_or_path", "") or model_type)

    # Multiply-adds per token of the linear layers of one decoder layer.
    @property
    def layer_linear_macs(self) -> int:
        D, d = self.hidden_size, self.head_dim
        return D * self.num_heads * d * 2 + 2 * D * self.num_kv_heads * d + 3 * D * self.intermediate_size

    @property
    def lm_head_macs(self) -> int:
        return self.hidden_size * self.vocab_size


def load_config(base: str):
    """A transformers config from a shipped name (``qwen2.5-3b``), a local path or a hub id (no weights)."""
    from transformers import AutoConfig

    key = base.strip().lower()
    if is_builtin(key):  # the built-in model's folder (converted on first use)
        base = resolve_base(key)
    elif key in KNOWN_BASES:
        data = json.loads((CONFIG_DIR / KNOWN_BASES[key]).read_text())
        data.pop("_comment", None)
        name = data.pop("_name_or_path", base)
        config = AutoConfig.for_model(data.pop("model_type"), **data)
        config._name_or_path = name
        return config
    path = Path(base)
    if path.is_file():  # a config.json
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise ValueError(f"{path} has no model_type: pass a model's config.json (or its folder, or a hub id).")
        config = AutoConfig.for_model(data.pop("model_type"), **data)
        config._name_or_path = str(path)
        return config
    return AutoConfig.from_pretrained(resolve_base(base))


def shape_of(config_or_base) -> ModelShape:
    if isinstance(config_or_base, ModelShape):
        return config_or_base
    if isinstance(config_or_base, str | os.PathLike):
        return ModelShape.from_config(load_config(str(config_or_base)), name=str(config_or_base))
    return ModelShape.from_config(config_or_base)


# ----------------------------------------------------------------------------------------------
# Validation and small helpers


def _check_memory(memory: str) -> str:
    if memory not in MEMORY_TYPES:
        raise ValueError(f"memory must be one of {', '.join(MEMORY_TYPES)}, got {memory!r}.")
    return memory


def _check_span(window: int, sinks: int, memory: str, levels: int) -> None:
    validate_window(window, sinks)
    _check_memory(memory)
    if not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}.")


def _check_tokens(n: int, what: str, minimum: int = 0) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {n!r}.")


def _causal_keys(n: int, span: int) -> int:
    """Sum over queries p = 0..n-1 of min(p + 1, span)."""
    if n <= span:
        return n * (n + 1) // 2
    return span * (span + 1) // 2 + (n - span) * span


def levels_in_use(m: int, levels: int) -> int:
    """Level states of a log-linear memory holding m >= 1 tokens: ceil(log2 m) + 1, at most ``levels``."""
    return min((m - 1).bit_length() + 1, levels)


def _sum_levels(m_max: int, levels: int, offset: int = 0) -> int:
    """Sum of levels_in_use(m) for m = 1..m_max, plus ``offset`` per term (closed form per power of two)."""
    total, lo = 0, 1
    while lo <= m_max:
        hi = min(m_max, 1 if lo == 1 else 2 * (lo - 1))  # levels constant on [lo, hi]: m in (2^(j-1), 2^j]
        total += (hi - lo + 1) * (levels_in_use(lo, levels) + offset)
        lo = hi + 1
    return total


# ----------------------------------------------------------------------------------------------
# Parameters


def base_parameters(shape: ModelShape) -> int:
    """Parameters of the base causal LM (tied embeddings counted once)."""
    s = shape
    D, d, H, Hkv, Ic = s.hidden_size, s.head_dim, s.num_heads, s.num_kv_heads, s.intermediate_size
    layer = D * H * d + 2 * D * Hkv * d + H * d * D + 3 * D * Ic + 2 * D
    layer += (H * d + 2 * Hkv * d) * s.qkv_bias + D * s.o_bias + (2 * Ic + D) * s.mlp_bias + 2 * d * s.qk_norm
    return s.num_layers * layer + s.vocab_size * D * (1 if s.tie_word_embeddings else 2) + D


def memory_parameters(shape: ModelShape, memory: str = "gdn", levels: int = 21) -> int:
    """Parameters AHN adds (all layers), as :class:`hippolm.ahn.memory.MemoryModule` has them."""
    base = _check_memory(memory).removeprefix("loglinear_")
    D, H, d = shape.hidden_size, shape.num_heads, shape.head_dim
    per_layer = _GATE_PROJECTIONS[base] * D * H + H * d * d + d + (2 * H if base in ("gdn", "mamba2") else 0)
    if memory.startswith("loglinear_"):
        per_layer += D * H * levels + H * levels
    return shape.num_layers * per_layer


# ----------------------------------------------------------------------------------------------
# Cache bytes


@dataclass
class CacheBytes:
    kv: int
    state: int = 0
    gates: int = 0
    positions: int = 0

    @property
    def total(self) -> int:
        return self.kv + self.state + self.gates + self.positions

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def full_cache_bytes(shape: ModelShape, context: int, kv_bytes: int = 2) -> CacheBytes:
    """KV cache of full attention holding ``context`` tokens."""
    _check_tokens(context, "context")
    return CacheBytes(kv=2 * shape.num_layers * context * shape.num_kv_heads * shape.head_dim * kv_bytes)


def ahn_cache_bytes(shape: ModelShape, context: int, window: int, sinks: int, memory: str = "gdn",
                    levels: int = 21, kv_bytes: int = 2, state_bytes: int = 4,
                    preallocated: bool = False) -> CacheBytes:
    """Cache of an AHN model holding ``context`` tokens (see the module docstring for what is counted)."""
    _check_span(window, sinks, memory, levels)
    _check_tokens(context, "context")
    s, lossless = shape, sinks + window
    held = lossless if preallocated else min(context, lossless)
    ring = window if preallocated else min(context, window)
    n_states = levels if memory.startswith("loglinear_") else 1
    gates = _WRITE_GATES[memory.removeprefix("loglinear_")]
    return CacheBytes(kv=2 * s.num_layers * held * s.num_kv_heads * s.head_dim * kv_bytes,
                      state=s.num_layers * n_states * s.num_heads * s.head_dim**2 * state_bytes,
                      gates=s.num_layers * ring * s.num_heads * gates * kv_bytes,
                      positions=s.num_layers * held * 4)


# ----------------------------------------------------------------------------------------------
# FLOPs


@dataclass
class Flops:
    linear: int
    attention: int
    lm_head: int
    memory: int = 0

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.lm_head + self.memory

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _memory_macs(shape: ModelShape, memory: str, levels: int, tokens: int, steps_from: int, steps: int) -> int:
    """Memory multiply-adds (all layers) for ``tokens`` tokens of which ``steps`` make memory steps,
    the memory holding ``steps_from + 1 .. steps_from + steps`` tokens after each step."""
    base = memory.removeprefix("loglinear_")
    D, H, d = shape.hidden_size, shape.num_heads, shape.head_dim
    proj = _GATE_PROJECTIONS[base] * D * H + H * d * d  # gates + read-out, every token
    if memory.startswith("loglinear_"):
        proj += D * H * levels
        level_sum = _sum_levels(steps_from + steps, levels) - _sum_levels(steps_from, levels)
        read = level_sum
        write = (2 * level_sum - steps) if base == "gdn" else steps  # 2(L-1)+1 per step for GDN
    else:
        read, write = steps, steps * (2 if base in ("gdn", "deltanet") else 1)
    return shape.num_layers * (tokens * proj + H * d * d * (read + write))


def prefill_flops(shape: ModelShape, n: int, *, window: int | None = None, sinks: int = 0, memory: str = "gdn",
                  levels: int = 21, logits: str = "last", causal: bool = True) -> Flops:
    """FLOPs of one forward over an ``n``-token prompt: full attention (``window=None``) or AHN."""
    _check_tokens(n, "n", 1)
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}.")
    s = shape
    attn_per_key = 2 * s.num_heads * s.head_dim
    if window is None:
        span, mem = n, 0
    else:
        _check_span(window, sinks, memory, levels)
        span = sinks + window
        mem = _memory_macs(s, memory, levels, n, 0, max(0, n - span))
    keys = _causal_keys(n, span) if causal else n * min(n, span)
    return Flops(linear=2 * n * s.num_layers * s.layer_linear_macs,
                 attention=2 * s.num_layers * attn_per_key * keys,
                 lm_head=2 * s.lm_head_macs * (n if logits == "all" else 1), memory=2 * mem)


def decode_flops(shape: ModelShape, context: int, *, window: int | None = None, sinks: int = 0,
                 memory: str = "gdn", levels: int = 21) -> Flops:
    """FLOPs of decoding one token with ``context`` tokens already cached."""
    _check_tokens(context, "context")
    s = shape
    if window is None:
        keys, mem = context + 1, 0
    else:
        _check_span(window, sinks, memory, levels)
        span = sinks + window
        keys = min(context + 1, span)
        steps = 1 if context >= span else 0
        mem = _memory_macs(s, memory, levels, 1, max(0, context - span), steps)
    return Flops(linear=2 * s.num_layers * s.layer_linear_macs,
                 attention=2 * s.num_layers * 2 * s.num_heads * s.head_dim * keys,
                 lm_head=2 * s.lm_head_macs, memory=2 * mem)


# ----------------------------------------------------------------------------------------------
# Side by side


@dataclass
class CostReport:
    base: str
    shape: dict
    memory: str
    window: int
    sinks: int
    levels: int
    context: int
    kv_dtype: str
    logits: str
    parameters: dict
    cache_bytes: dict
    prefill_flops: dict
    decode_flops: dict
    ratios: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def compare(base, *, window: int = 32640, sinks: int = 128, memory: str = "gdn", context: int = 131072,
            levels: int = 21, kv_dtype: str = "bfloat16", logits: str = "last", causal: bool = True) -> CostReport:
    """Parameters, cache bytes at ``context``, prefill FLOPs of ``context`` tokens and FLOPs per token
    decoded at ``context``, for full attention and AHN."""
    _check_span(window, sinks, memory, levels)
    _check_tokens(context, "context", 1)
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPE_BYTES)}, got {kv_dtype!r}.")
    s = shape_of(base)
    kvb = KV_DTYPE_BYTES[kv_dtype]
    span = dict(window=window, sinks=sinks, memory=memory, levels=levels)
    params = {"base": base_parameters(s), "memory": memory_parameters(s, memory, levels)}
    cache = {"full": full_cache_bytes(s, context, kvb).to_dict(),
             "ahn": ahn_cache_bytes(s, context, kv_bytes=kvb, **span).to_dict()}
    pre = {"full": prefill_flops(s, context, logits=logits, causal=causal).to_dict(),
           "ahn": prefill_flops(s, context, logits=logits, causal=causal, **span).to_dict()}
    dec = {"full": decode_flops(s, context).to_dict(), "ahn": decode_flops(s, context, **span).to_dict()}
    ratios = {"cache": cache["ahn"]["total"] / cache["full"]["total"],
              "prefill_flops": pre["ahn"]["total"] / pre["full"]["total"],
              "decode_flops": dec["ahn"]["total"] / dec["full"]["total"],
              "parameters": (params["base"] + params["memory"]) / params["base"]}
    return CostReport(base=s.name, shape=asdict(s), memory=memory, window=window, sinks=sinks, levels=levels,
                      context=context, kv_dtype=kv_dtype, logits=logits, parameters=params, cache_bytes=cache,
                      prefill_flops=pre, decode_flops=dec, ratios=ratios)


# ----------------------------------------------------------------------------------------------
# The paper's figures


def paper_cache_ratio(shape: ModelShape, context: int = 128_000, lossless: int = 32768) -> Fraction:
    """AHN/full cache as the paper counts it: window KV + one d x d state per query head, per layer,
    in elements (the state at the KV dtype), vs the full KV: ``(2*W*d*Hkv + d^2*Hq) / (2*n*d*Hkv)``."""
    d = shape.head_dim
    return Fraction(2 * lossless * d * shape.num_kv_heads + d * d * shape.num_heads,
                    2 * context * d * shape.num_kv_heads)


def paper_reproduction(base="qwen2.5-3b", memory: str = "gdn") -> dict:
    """The paper's two Qwen2.5-3B-Instruct figures next to ours, under each convention tried."""
    s = shape_of(base)
    sinks, window = PAPER["sinks"], PAPER["window"]
    lossless = sinks + window
    span = dict(window=window, sinks=sinks, memory=memory)

    def red(a, b):
        return 1 - a / b

    cache = {
        "paper": PAPER["cache_reduction"],
        "n128000_state_as_kv_elements": float(1 - paper_cache_ratio(s, 128_000, lossless)),
        "n131072_state_as_kv_elements": float(1 - paper_cache_ratio(s, 131_072, lossless)),
        "n131072_fp32_state": red(full_cache_bytes(s, lossless).kv + s.num_layers * s.num_heads * s.head_dim**2 * 4,
                                  full_cache_bytes(s, 131_072).kv),
        "n128000_fp32_state": red(full_cache_bytes(s, lossless).kv + s.num_layers * s.num_heads * s.head_dim**2 * 4,
                                  full_cache_bytes(s, 128_000).kv),
        "ours_n131072_as_held": red(ahn_cache_bytes(s, 131_072, **span).total, full_cache_bytes(s, 131_072).total),
    }
    flops = {"paper": PAPER["flops_reduction"]}
    for n in (128_000, 131_072):
        for logits in ("all", "last"):
            f, a = prefill_flops(s, n, logits=logits), prefill_flops(s, n, logits=logits, **span)
            flops[f"prefill_n{n}_logits_{logits}"] = red(a.total, f.total)
        d_f, d_a = decode_flops(s, n), decode_flops(s, n, **span)
        flops[f"decode_per_token_n{n}"] = red(d_a.total, d_f.total)
    f, a = prefill_flops(s, 128_000, logits="all"), prefill_flops(s, 128_000, logits="all", **span)
    emb = 2 * 128_000 * s.lm_head_macs  # the embedding lookup charged as a one-hot matmul
    flops["prefill_n128000_logits_all_embedding_as_matmul"] = red(a.total + emb, f.total + emb)
    target = 1 - PAPER["flops_reduction"]
    extra = target * f.total - a.total  # FLOPs the AHN side lacks for AHN/full = 0.595
    evicted = 128_000 - lossless
    flops["gap_n128000_logits_all"] = {
        "ahn_extra_flops_needed": extra, "ahn_extra_fraction": extra / a.total,
        "per_compressed_token": extra / evicted, "ours_memory_per_compressed_token": a.memory / evicted,
        # alternatively a larger per-token base cost x on both sides: (x + a_rest)/(x + f_rest) = target
        "base_params_per_token_needed": ((target * (f.attention) - a.attention - a.memory)
                                         / (1 - target) / 128_000 / 2),
    }
    return {"cache_reduction": cache, "flops_reduction": flops}


# ----------------------------------------------------------------------------------------------
# CLI


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {prefix}{unit}"
    return f"{x:,.0f} {unit}"


def _count(x: int) -> str:
    return f"{x / 1e9:,.3f} B" if x >= 1e9 else f"{x / 1e6:,.2f} M"


def format_report(r: CostReport) -> str:
    s = r.shape
    lossless = r.sinks + r.window
    lines = [
        f"{r.base} ({s['model_type']}): {s['num_layers']} layers, hidden {s['hidden_size']}, "
        f"{s['num_heads']} query / {s['num_kv_heads']} KV heads x {s['head_dim']}, vocab {s['vocab_size']}",
        f"AHN: {r.memory} memory, {r.sinks} sinks + {r.window} window = {lossless} tokens lossless; "
        f"context {r.context:,} tokens; KV {r.kv_dtype}, memory state fp32",
        "",
    ]
    w = (44, 16, 16, 10)

    def row(label, full, ahn, ratio=None):
        rt = ratio if isinstance(ratio, str) else "" if ratio is None else f"{100 * ratio:.1f}%"
        return f"{label:<{w[0]}}{full:>{w[1]}}{ahn:>{w[2]}}{rt:>{w[3]}}"

    lines.append(row("", "full attention", "AHN", "AHN/full"))
    p = r.parameters
    lines.append(row("parameters", _count(p["base"]), _count(p["base"] + p["memory"]), r.ratios["parameters"]))
    lines.append(row("  memory parameters", "-", _count(p["memory"])))
    cf, ca = r.cache_bytes["full"], r.cache_bytes["ahn"]
    lines.append(row(f"cache at {r.context:,} tokens", _si(cf["total"], "B"), _si(ca["total"], "B"), r.ratios["cache"]))
    for key, label in (("kv", "KV"), ("state", "memory state"), ("gates", "write gates"),
                       ("positions", "slot positions")):
        lines.append(row(f"  {label}", _si(cf[key], "B") if cf[key] else "-", _si(ca[key], "B")))
    for title, key, ratio in ((f"prefill FLOPs, {r.context:,} tokens", "prefill_flops", "prefill_flops"),
                              (f"FLOPs per token decoded at {r.context:,}", "decode_flops", "decode_flops")):
        ff, fa = getattr(r, key)["full"], getattr(r, key)["ahn"]
        lines.append(row(title, _si(ff["total"], "FLOP"), _si(fa["total"], "FLOP"), r.ratios[ratio]))
        for part in ("linear", "attention", "memory", "lm_head"):
            label = part.replace("_", " ") + (f" (logits: {r.logits})" if part == "lm_head" and key ==
                                              "prefill_flops" else "")
            lines.append(row(f"  {label}", _si(ff[part], "FLOP") if ff[part] else "-", _si(fa[part], "FLOP")))
    lines += ["", "FLOPs = 2 x multiply-adds of matrix products; causal attention charges only the keys each query "
              "attends (see hippolm.accounting)."]
    return "\n".join(lines)


def cost_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hippolm cost",
        description="Analytic parameters, cache bytes and FLOPs of full attention vs AHN, from a model config alone.")
    parser.add_argument("--base", default="qwen2.5-3b",
                        help="shipped config (qwen2.5-3b, qwen2.5-7b), a local model dir / config.json, or a hub id")
    parser.add_argument("--window", type=int, default=PAPER["window"], help="sliding window tokens (default 32640)")
    parser.add_argument("--sinks", type=int, default=PAPER["sinks"], help="attention sink tokens (default 128)")
    parser.add_argument("--memory", default="gdn", help=f"one of {', '.join(MEMORY_TYPES)} (default gdn)")
    parser.add_argument("--context", type=int, default=131072, help="context length in tokens (default 131072)")
    parser.add_argument("--levels", type=int, default=21, help="level states of log-linear memories (default 21)")
    parser.add_argument("--kv-dtype", default="bfloat16", choices=sorted(KV_DTYPE_BYTES))
    parser.add_argument("--logits", default="last", choices=("last", "all"),
                        help="prefill logits at the last position (default) or every position")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the figures as JSON to PATH (or stdout with no PATH)")
    parser.add_argument("--measure", default="auto", choices=("auto", "on", "off"),
                        help="also measure peak GPU memory of both systems (random weights from the config, "
                             "prefill of --context tokens + 1 decoded token): auto = when CUDA is present")
    parser.add_argument("--measure-chunk", type=int, default=4096, help="prefill chunk of the measurement")
    parser.add_argument("--measure-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    try:
        report = compare(args.base, window=args.window, sinks=args.sinks, memory=args.memory, context=args.context,
                         levels=args.levels, kv_dtype=args.kv_dtype, logits=args.logits)
    except (ValueError, BuiltinError) as e:  # BuiltinError: `builtin` without its PyPI package
        parser.error(str(e))
    except OSError as e:  # a hub id that cannot be fetched, a folder without config.json
        parser.error(f"cannot read the config of --base {args.base!r} ({e}); pass a shipped name "
                     f"({', '.join(sorted({k for k in KNOWN_BASES if '/' not in k}))}), a local config.json or "
                     f"model folder, or a hub id reachable from here.")
    measured, skipped = _measure(args, parser)
    data = {**report.to_dict(), "measured": measured, "measured_skipped": skipped}
    if args.json == "-":
        print(json.dumps(data, indent=2))
        return 0
    print(format_report(report))
    if measured is not None:
        from .eval.cost import format_measured

        print()
        print(format_measured(measured))
    else:
        print(f"\nmeasured peak memory: skipped ({skipped})")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


def _measure(args, parser) -> tuple[dict | None, str | None]:
    """Peak memory on the GPU when asked (or, with auto, when one is present): (figures, None)
    or (None, why skipped)."""
    if args.measure == "off":
        return None, "--measure off"
    import torch

    if not torch.cuda.is_available():
        if args.measure == "on":
            parser.error("--measure on needs a CUDA device; none is visible (use --measure auto or off).")
        return None, "no CUDA device"
    from .eval.cost import measure_peak_memory

    return measure_peak_memory(args.base, window=args.window, sinks=args.sinks, memory=args.memory,
                               context=args.context, dtype=getattr(torch, args.measure_dtype),
                               chunk_size=args.measure_chunk), None

if __name__ == "__main__":
    raise SystemExit(cost_main())


__all__ = [
    "CacheBytes", "CostReport", "Flops", "ModelShape", "ahn_cache_bytes", "base_parameters", "compare", "cost_main",
    "decode_flops", "full_cache_bytes", "levels_in_use", "load_config", "memory_parameters", "paper_cache_ratio",
    "paper_reproduction", "prefill_flops", "shape_of",
]
