"""Turn a pretrained Hugging Face causal LM into an AHN model, and use it.

One mechanism serves every family whose attention modules have ``q_proj``/``k_proj``/``v_proj``/
``o_proj`` and a module-level ``apply_rotary_pos_emb`` (Llama, Mistral, Qwen2/2.5, Qwen3, ...):
the class of each attention module is swapped for a subclass that adds the memory, so weight
names, loading and ``generate`` stay those of the base model.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..hf_compat import cache_arg, expand_size, generation_config, pick_cache
from .attention import AHNAttentionMixin
from .cache import AHNCache
from .config import MEMORY_TYPES, AHNConfig, validate_window
from .graph import GraphDecoder, graph_generate
from .memory import MemoryModule

# Our attention builds its own masks; an attention implementation transformers has no mask
# function for makes the base model skip building (quadratic-size) masks it would not use.
ATTN_IMPLEMENTATION = "hippolm_ahn"
AttentionInterface.register(ATTN_IMPLEMENTATION, sdpa_attention_forward)

MEMORY_FILE, CONFIG_FILE = "memory.safetensors", "ahn_config.json"
_AHN_CLASSES: dict[type, type] = {}


def _ahn_class(cls: type) -> type:
    if cls not in _AHN_CLASSES:
        _AHN_CLASSES[cls] = type(f"AHN{cls.__name__}", (AHNAttentionMixin, cls), {})
    return _AHN_CLASSES[cls]


def _decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} is not supported: no decoder layer list (model.model.layers) found. "
                         "hippolm converts decoder-only causal LMs such as Llama, Mistral, Qwen2/2.5 and Qwen3.")
    return layers


def fingerprint(model: PreTrainedModel) -> dict:
    """Shapes a memory depends on; a memory file is refused for a base that differs."""
    c = model.config
    heads = c.num_attention_heads
    return {"model_type": c.model_type, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": heads, "num_key_value_heads": getattr(c, "num_key_value_heads", heads),
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads}


def _capture_padding(module, args, kwargs):
    """Hand the 2-D attention mask to the AHN attention layers (the base model only passes a 4-D one)."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if isinstance(mask, torch.Tensor) and mask.ndim == 2 and not bool(mask.all()):
        kwargs["ahn_attention_mask"] = mask
    return args, kwargs


def convert(model: PreTrainedModel, config: AHNConfig, memory_dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Add a memory to every decoder layer of ``model`` in place, freeze the base, return it."""
    layers = _decoder_layers(model)
    if any(isinstance(getattr(layer, "self_attn", None), AHNAttentionMixin) for layer in layers):
        raise ValueError(f"{type(model).__name__} already has an AHN memory (it is an AHN model's .base). Convert "
                         "a freshly loaded base, or load a saved memory with from_base(base, memory=folder).")
    fp = fingerprint(model)
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, n)]
        rope = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
        if attn is None or missing or rope is None:
            raise ValueError(f"{type(model).__name__} is not supported: layer {i} attention "
                             f"{type(attn).__name__} lacks {missing or ['apply_rotary_pos_emb']}. hippolm needs "
                             "separate q/k/v/o projections and rotary embeddings (Llama, Mistral, Qwen2, Qwen3).")
    for p in model.parameters():
        p.requires_grad_(False)
    weight = next(model.parameters())
    for layer in layers:
        attn = layer.self_attn
        attn.ahn_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the family's own RoPE
        attn.__class__ = _ahn_class(type(attn))
        attn.ahn_config = config
        attn.ahn = MemoryModule(config.memory, fp["hidden_size"], fp["num_attention_heads"], fp["head_dim"],
                                config.levels).to(device=weight.device, dtype=memory_dtype or weight.dtype)
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    model.get_decoder().register_forward_pre_hook(_capture_padding, with_kwargs=True)
    return model


class AHNForCausalLM(nn.Module):
    """A frozen base causal LM with sinks + sliding window attention and a trained memory.

    ``model.base`` is the (converted) Hugging Face model; ``forward`` and ``generate`` take the
    usual arguments plus an optional AHN cache (``past_key_values``, see :meth:`new_cache`).
    """

    def __init__(self, base: PreTrainedModel, config: AHNConfig):
        super().__init__()
        self.base = base
        self.ahn_config = config

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_base(cls, base: str | os.PathLike | PreTrainedModel, memory: str | os.PathLike = "gdn", *,
                  window: int | None = None, sinks: int | None = None, levels: int | None = None,
                  dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                  memory_dtype: torch.dtype | None = None, **hf_kwargs) -> AHNForCausalLM:
        """Convert ``base`` (a hub id, local path, loaded model, or ``"builtin"``: SmolLM2-135M-Instruct,
        see :mod:`hippolm.builtin`) and add a memory.

        ``memory`` is a memory type (``gdn``, ``deltanet``, ``mamba2``, ``loglinear_gdn``,
        ``loglinear_mamba2``: a new, zero-output memory) or a folder written by :meth:`save_memory`.
        ``window``/``sinks`` default to 2048/128, or to the saved memory's training values.
        """
        if isinstance(base, PreTrainedModel):
            model, name = base, getattr(base.config, "_name_or_path", "")
        else:
            from ..builtin import resolve_base

            model = AutoModelForCausalLM.from_pretrained(resolve_base(base), dtype=dtype or "auto", **hf_kwargs)
            name = str(base)
        if device is not None:
            model = model.to(device)
        saved = None
        if str(memory) not in MEMORY_TYPES:
            folder = Path(memory)
            if not (folder / CONFIG_FILE).is_file():
                raise ValueError(f"memory must be one of {', '.join(MEMORY_TYPES)} or a folder written by "
                                 f"save_memory() (with {CONFIG_FILE}); got {memory!r}.")
            saved = AHNConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
            if saved.base_fingerprint != fingerprint(model):
                raise ValueError(f"the memory in {folder} was trained for base {saved.base_model!r} "
                                 f"{saved.base_fingerprint}, which does not match this base {fingerprint(model)}.")
        config = AHNConfig(
            memory=saved.memory if saved else str(memory),
            window=window if window is not None else (saved.window if saved else 2048),
            sinks=sinks if sinks is not None else (saved.sinks if saved else 128),
            levels=levels if levels is not None else (saved.levels if saved else 21),
            base_model=name, base_fingerprint=fingerprint(model),
        )
        if saved and saved.loglinear and levels is not None and levels != saved.levels:
            raise ValueError(f"the saved memory has {saved.levels} levels; cannot load it with levels={levels}.")
        self = cls(convert(model, config, memory_dtype), config)
        if saved:
            self.load_memory(Path(memory) / MEMORY_FILE)
        return self

    # --- memory parameters -------------------------------------------------------------------------
    def memory_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.base.named_parameters() if ".ahn." in n}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The memory parameters: the only ones that train."""
        return list(self.memory_state_dict().values())

    def save_memory(self, path: str | os.PathLike) -> None:
        """Write only the memory parameters (safetensors) and the AHN config to folder ``path``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous().cpu() for n, p in self.memory_state_dict().items()}
        tmp = folder / (MEMORY_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "memory": self.ahn_config.memory})
        os.replace(tmp, folder / MEMORY_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(self.ahn_config.to_dict(), indent=2))

    def load_memory(self, file: str | os.PathLike) -> None:
        tensors = load_file(str(file))
        own = self.memory_state_dict()
        if set(tensors) != set(own):
            raise ValueError(f"{file} does not hold this model's memory parameters "
                             f"(missing {sorted(set(own) - set(tensors))[:3]}, unexpected "
                             f"{sorted(set(tensors) - set(own))[:3]}).")
        with torch.no_grad():
            for n, p in own.items():
                if tensors[n].shape != p.shape:
                    raise ValueError(f"{file}: {n} has shape {tuple(tensors[n].shape)}, expected {tuple(p.shape)}.")
                p.copy_(tensors[n])

    # --- running -------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def new_cache(self, window: int | None = None, sinks: int | None = None) -> AHNCache:
        """An empty bounded cache (defaults: the model's window and sinks)."""
        return AHNCache(len(_decoder_layers(self.base)), self.ahn_config.window if window is None else window,
                        self.ahn_config.sinks if sinks is None else sinks)

    def graph_decoder(self, cache: AHNCache) -> GraphDecoder:
        """A CUDA-graph decoder for ``cache`` (holding at least one token; see :class:`GraphDecoder`)."""
        return GraphDecoder(self, cache)

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, *, cache: AHNCache | None = None,
                window: int | None = None, sinks: int | None = None, use_cache: bool = False, **kwargs):
        """The base model's forward with short-term + long-term memory. ``window``/``sinks``
        override the model's for this call (training samples them); a cache fixes its own. The cache
        goes in as ``cache`` or ``past_key_values`` (transformers' name for it before 5.25)."""
        past_key_values = pick_cache(cache, past_key_values)
        if input_ids is not None and input_ids.shape[-1] == 0:
            raise ValueError("input_ids is empty: pass at least one token.")
        if window is not None or sinks is not None:
            validate_window(self.ahn_config.window if window is None else window,
                            self.ahn_config.sinks if sinks is None else sinks)
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache(window, sinks)
        return self.base(input_ids=input_ids, attention_mask=attention_mask, **cache_arg(past_key_values),
                         use_cache=past_key_values is not None, ahn_window=window, ahn_sinks=sinks, **kwargs)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: AHNCache | None = None, chunk_size: int = 4096, progress: bool = False) -> AHNCache:
        """Feed the tokens of ``input_ids`` not yet in ``cache`` in chunks (no logits computed);
        ``progress``: a progress bar over the chunks. A chunk attends to itself and the window, so
        chunks longer than the window (at least 512) cost more per token: they are cut to it (CPU,
        2 threads, builtin model, window 2048, 4096 tokens: 16.2 s in one chunk, 10.2 s in chunks of
        2048; benchmarks/prefill_chunk_cpu.py)."""
        from tqdm.auto import tqdm

        cache = cache if cache is not None else self.new_cache()
        chunk_size = min(chunk_size, max(cache.window, 512))
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        starts = range(cache.get_seq_length(), input_ids.shape[1], chunk_size)
        for start in tqdm(starts, desc="prefill", unit="chunk", disable=not progress or len(starts) < 2,
                          leave=False):
            end = min(start + chunk_size, input_ids.shape[1])
            self.base.get_decoder()(input_ids=input_ids[:, start:end], attention_mask=mask[:, :end],
                                    position_ids=positions[:, start:end], **cache_arg(cache), use_cache=True)
        return cache

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 past_key_values: AHNCache | None = None, prefill_chunk_size: int = 4096, *,
                 cache: AHNCache | None = None, cuda_graph: bool = False, prefill_progress: bool = False, **kwargs):
        """``transformers`` generate with a bounded cache. The prompt (all but its last token) is
        prefilled in chunks of ``prefill_chunk_size``, so prompts of any length fit; pass the cache
        of an earlier call (and the whole conversation as ``input_ids``) to continue it.
        ``cuda_graph`` (model on CUDA): each new token from a replayed CUDA graph
        (:func:`~hippolm.ahn.graph.graph_generate`: greedy or sampling with temperature, top-k, top-p,
        repetition penalty, eos / pad; other settings get a clear error), not transformers' loop.
        ``prefill_progress``: a progress bar over the prefill's chunks."""
        cache = pick_cache(cache, past_key_values)
        cache = cache if cache is not None else self.new_cache()
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: generate needs at least one prompt token (e.g. the BOS token).")
        if cache.get_seq_length() >= input_ids.shape[1]:
            raise ValueError(f"the cache already holds {cache.get_seq_length()} tokens and input_ids has "
                             f"{input_ids.shape[1]}: pass the whole conversation including at least one new token "
                             "(a cache from prefill(ids) holds every token of ids; prefill ids[:, :-1] instead).")
        if input_ids.shape[1] > 1:
            self.prefill(input_ids[:, :-1], None if attention_mask is None else attention_mask[:, :-1], cache,
                         prefill_chunk_size, prefill_progress)
        if cuda_graph:  # resolves the settings itself, and refuses beams / several sequences
            return graph_generate(self, input_ids, cache, **kwargs)
        expand = expand_size(generation_config(self.base, **kwargs)[0])
        if expand > 1 and cache.get_seq_length():
            # transformers repeats each row of input_ids for beams / returned sequences, not a cache
            # passed in: the prefilled rows are repeated the same way
            cache.batch_repeat_interleave(expand)
        return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **cache_arg(cache),
                                  **kwargs)
