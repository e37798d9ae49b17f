"""A standalone causal LM whose token mixer per layer is configurable, as a Hugging Face model.

Pre-norm blocks: x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). Mixers come from
:func:`hippolm.layers.build_mixer` (attention, sliding-window attention, Mamba-2, Gated DeltaNet
and their log-linear forms). ``save_pretrained``/``from_pretrained``/``generate`` work as for any
transformers model; the decode cache is a :class:`HippoCache` holding each layer's state object.
Sequences in a batch must have equal lengths (no padding): recurrent layers cannot skip pad tokens.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..hf_compat import cache_arg, pick_cache
from ..layers import MIXER_TYPES, MixerArgs, RMSNorm, build_mixer, map_state
from ..layers.common import A_INIT_RANGE, acc_dtype, check_A_init_range, residual_output


class HippoConfig(PreTrainedConfig):
    """Configuration of :class:`HippoForCausalLM`.

    ``mixer`` is one of ``attention``, ``swa``, ``mamba2``, ``gdn``, ``loglinear_mamba2``,
    ``loglinear_gdn``, or a list with one per layer. ``head_dim`` defaults to
    hidden_size / num_attention_heads; ``state_size`` (Mamba-2 key dim per head) to head_dim;
    value dims are head_dim * expand_v. ``window`` is the sliding-window span of ``swa`` layers;
    ``max_position`` the longest sequence (it sets the levels of log-linear layers).
    ``A_init_range`` (lo, hi): recurrent layers' decay rates start at A ~ U(lo, hi) (Mamba-2's
    (1, 16) by default; mamba_ssm's ``A_init_range``).
    ``initializer_range`` (std of the normal init of the embeddings and of every linear weight
    that reads the normalised residual stream) defaults to hidden_size ** -0.5: about the usual
    0.02 at hidden size 2048, and what keeps projections of a small model at unit scale (0.02 at
    hidden size 64 made q/k/v projections ~0.16 of their input, and Gated DeltaNet and Mamba-2
    stayed at chance on MQAR). The projections that write into the residual stream (mixer output
    projections, the MLP's down projection) start at initializer_range / sqrt(fan_in), so each
    block adds about an embedding's scale and the token embeddings stay visible (at the full std
    the blocks drowned them ~8x at hidden size 64, and softmax attention never learned MQAR).
    """

    model_type = "hippolm"

    vocab_size: int = 8192
    hidden_size: int = 64
    intermediate_size: int | None = None
    num_hidden_layers: int = 2
    num_attention_heads: int = 1
    head_dim: int | None = None
    state_size: int | None = None
    expand_v: int = 1
    conv_size: int = 4
    A_init_range: tuple[float, float] | list[float] = A_INIT_RANGE
    mixer: str | list[str] = "attention"
    window: int = 64
    max_position: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float | None = None  # None: hidden_size ** -0.5
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads}; set head_dim explicitly.")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.initializer_range is None and isinstance(self.hidden_size, int) and self.hidden_size > 0:
            self.initializer_range = self.hidden_size**-0.5
        super().__post_init__(**kwargs)
        mixers = self.layer_mixers
        unknown = sorted({m for m in mixers if m not in MIXER_TYPES})
        if unknown:
            raise ValueError(f"unknown mixer {', '.join(map(repr, unknown))}; choose from {', '.join(MIXER_TYPES)} "
                             "(or a list with one per layer).")
        if len(mixers) != self.num_hidden_layers:
            raise ValueError(f"mixer lists {len(mixers)} layers but num_hidden_layers is {self.num_hidden_layers}.")
        if "swa" in mixers and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be a positive int for 'swa' layers, got {self.window!r}.")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                     "max_position", "expand_v", "conv_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        self.A_init_range = list(check_A_init_range(self.A_init_range))  # a list: JSON round-trips it

    @property
    def layer_mixers(self) -> list[str]:
        """The mixer of every layer."""
        return [self.mixer] * self.num_hidden_layers if isinstance(self.mixer, str) else list(self.mixer)

    def mixer_args(self) -> MixerArgs:
        return MixerArgs(hidden_size=self.hidden_size, num_heads=self.num_attention_heads, head_dim=self.head_dim,
                         state_size=self.state_size, expand_v=self.expand_v, conv_size=self.conv_size,
                         window=self.window, max_position=self.max_position, rope_theta=self.rope_theta,
                         eps=self.rms_norm_eps, A_init_range=tuple(self.A_init_range))


# --- cache ----------------------------------------------------------------------------------------


class HippoLayerCache(CacheLayerMixin):
    """One layer's state object (``KVCache`` or ``RecurrentState``), written by the mixer itself."""

    is_compileable = False
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.state = None
        self.seq_len = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the state object is created by the mixer on its first call

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("HippoLayerCache holds mixer state objects; mixers replace `state`, not update().")

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_len + query_length, 0

    def reset(self) -> None:
        self.state, self.seq_len = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = map_state(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = map_state(self.state, lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state = map_state(self.state, lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be rolled back; HippoCache does not support crop().")


class HippoCache(Cache):
    """Decode cache of :class:`HippoForCausalLM`: one :class:`HippoLayerCache` per layer."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[HippoLayerCache() for _ in range(num_layers)])


# --- model ----------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = residual_output(nn.Linear(intermediate_size, hidden_size, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HippoBlock(nn.Module):
    def __init__(self, config: HippoConfig, mixer: str):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = build_mixer(mixer, config.mixer_args())
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, state=None, output_state: bool = False):
        h, state = self.mixer(self.mixer_norm(x), state, output_state=output_state)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), state


class HippoPreTrainedModel(PreTrainedModel):
    config: HippoConfig
    config_class = HippoConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["HippoBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' generic init (normal Linear/Embedding, unit norms) runs on the children
        # first, then here each mixer restores its special parameters (decays, conv, levels).
        super()._init_weights(module)
        if isinstance(module, nn.Linear) and getattr(module, "_residual_output", False):
            # A branch's output projection (attention / mixer out-projection, MLP down projection)
            # gets std initializer_range / sqrt(fan_in): each branch then adds about one token
            # embedding's scale (per-element std initializer_range) to the residual stream. At the
            # generic std it added unit scale, ~sqrt(hidden_size) times the embeddings, and at
            # hidden size 64 softmax attention stayed on MQAR's plateau for 1000 steps.
            # init.normal_ skips weights loaded from a checkpoint.
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range / module.in_features**0.5)
        if hasattr(module, "reset_special_parameters"):
            module.reset_special_parameters()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not make a DynamicCache; forward creates a HippoCache


class HippoModel(HippoPreTrainedModel):
    def __init__(self, config: HippoConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HippoBlock(config, m) for m in config.layer_mixers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cache: HippoCache | None = None) -> torch.Tensor:
        """Final hidden states [B, T, D]; with ``cache``, continue from it and update it in place."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds.")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if cache is not None and len(cache.layers) != len(self.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(self.layers)}.")
        for i, block in enumerate(self.layers):
            layer = None if cache is None else cache.layers[i]
            x, state = block(x, None if layer is None else layer.state, output_state=layer is not None)
            if layer is not None:
                layer.state = state
                layer.seq_len += x.shape[1]
        return self.norm(x)


class HippoForCausalLM(HippoPreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HippoConfig):
        super().__init__(config)
        self.model = HippoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def new_cache(self) -> HippoCache:
        return HippoCache(self.config.num_hidden_layers)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: HippoCache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, cache: HippoCache | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab] (the last ``logits_to_keep`` positions if > 0).

        ``labels`` as in transformers (shifted inside; -100 ignored). ``use_cache`` defaults to
        whether a cache was passed; with it, the cache (created if None) is returned updated.
        ``attention_mask`` may only mark every token (no padding); ``position_ids`` are ignored,
        positions come from the cache. The cache goes in as ``cache`` or ``past_key_values``
        (transformers' name for it before 5.25; its generate passes the name it uses).
        """
        past_key_values = pick_cache(cache, past_key_values)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("HippoForCausalLM does not support padding (attention_mask with zeros): recurrent "
                             "mixers cannot skip tokens. Batch sequences of equal length, or run them one by one.")
        if not isinstance(past_key_values, HippoCache | None):
            raise ValueError(f"past_key_values must be a HippoCache (model.new_cache()), got "
                             f"{type(past_key_values).__name__}.")
        if use_cache is None:
            use_cache = past_key_values is not None
        cache = (past_key_values if past_key_values is not None else self.new_cache()) if use_cache else None
        hidden = self.model(input_ids, inputs_embeds, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].flatten(0, 1).to(acc_dtype(logits.dtype))
            loss = F.cross_entropy(shifted, labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache_arg(cache))


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(HippoConfig.model_type, HippoConfig, exist_ok=True)
    AutoModelForCausalLM.register(HippoConfig, HippoForCausalLM, exist_ok=True)


_register()
