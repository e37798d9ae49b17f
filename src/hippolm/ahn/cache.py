"""The bounded cache of an AHN model: per layer, sinks + a ring-buffer window + the memory state.

Its size is fixed once the context passes the window (the memory state of log-linear memories
grows with the log of the tokens it holds). It is a transformers ``Cache`` so ``generate`` and
multi-turn reuse work as with any other cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import ops
from ..ops.decode import cache_write
from .config import validate_window


class AHNLayerCache(CacheLayerMixin):
    """State of one layer for B sequences (stream index = token index in the padded batch).

    ``keys``/``values`` [B, Hkv, sinks + window, d] hold, in one buffer so decoding attends to it
    without copies, the first ``sinks`` real tokens of each sequence at slots [0, sinks) and the
    last ``window`` stream tokens at slot ``sinks + stream_index % window``. ``slot_pos`` is each
    slot's real position (-1: empty or padding); ``ring_gates`` the memory write gates computed
    when each window token arrived, stored in the key dtype (the memory rounds them the same way
    when training, so both agree), zero for padding and sink tokens (never written); ``memory``
    the long-term state; ``real_seen`` real tokens seen; ``cursor`` [B] the stream length as a
    device tensor, so a decode step can be captured in a CUDA graph.
    """

    is_compileable = False
    is_sliding = True

    def __init__(self, window: int, sinks: int):
        super().__init__()
        self.window, self.sinks = window, sinks
        self.stream_len = 0
        self.slot_pos = self.ring_gates = None
        self.real_seen: torch.Tensor | None = None
        self.cursor: torch.Tensor | None = None
        self.memory = None
        self.all_visible = False  # every slot filled by a real token of the window or the sinks

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, gates: torch.Tensor) -> None:
        B, Hkv, _, d = key_states.shape
        n, dev = self.sinks + self.window, key_states.device
        self.keys = key_states.new_zeros(B, Hkv, n, d)
        self.values = value_states.new_zeros(B, Hkv, n, value_states.shape[-1])
        self.slot_pos = torch.full((B, n), -1, dtype=torch.int32, device=dev)
        self.ring_gates = key_states.new_zeros(B, self.window, *gates.shape[2:])
        self.real_seen = torch.zeros(B, dtype=torch.long, device=dev)
        self.cursor = torch.zeros(B, dtype=torch.long, device=dev)
        self.is_initialized = True

    def ring_slot(self, stream_index: int) -> int:
        return self.sinks + stream_index % self.window

    def ring_in_stream_order(self) -> tuple[torch.Tensor, ...]:
        """Window entries ordered so that index j holds stream token ``stream_len - window + j``."""
        order = (torch.arange(self.window, device=self.keys.device) + self.stream_len) % self.window
        slots = order + self.sinks
        return (self.keys[:, :, slots], self.values[:, :, slots], self.ring_gates[:, order].float(),
                self.slot_pos[:, slots].long())

    def visible_pos(self) -> torch.Tensor:
        """Slot positions for attention: window copies of sink tokens hidden (the sink slot serves)."""
        S = self.sinks
        ring = self.slot_pos[:, S:]
        return torch.cat([self.slot_pos[:, :S], torch.where(ring >= S, ring, -1)], 1).long()

    def append(self, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, pos: torch.Tensor) -> None:
        """Add new stream tokens: k, v [B, Hkv, T, d]; gates [B, T, ...]; pos [B, T] (-1: padding)."""
        T, W, S = k.shape[2], self.window, self.sinks
        if T == 1:  # one kernel, indexed by the device cursor: no host value in a decode step
            self.decode_write(k[:, :, 0], v[:, :, 0], gates[:, 0], pos[:, 0])
            return
        keep = min(T, W)
        order = torch.arange(self.stream_len + T - keep, self.stream_len + T, device=k.device) % W
        self.keys[:, :, S + order] = k[:, :, T - keep :]
        self.values[:, :, S + order] = v[:, :, T - keep :]
        # Tokens never written into the memory (padding, sinks) get zero write gates: a memory step on
        # them (decoding while the window fills runs one per token) is then a no-op
        gates = torch.where((pos >= S)[:, :, None, None], gates, 0)
        self.ring_gates[:, order] = gates[:, T - keep :].to(self.ring_gates.dtype)
        self.slot_pos[:, S + order] = pos[:, T - keep :].to(self.slot_pos.dtype)
        if S and not self.all_visible:
            is_sink = (pos >= 0) & (pos < S)
            if bool(is_sink.any()):
                b, t = is_sink.nonzero(as_tuple=True)
                slot = pos[b, t]
                self.keys[b, :, slot] = k[b, :, t]
                self.values[b, :, slot] = v[b, :, t]
                self.slot_pos[b, slot] = slot.to(self.slot_pos.dtype)
        self.stream_len += T
        self.cursor += T
        self.real_seen += (pos >= 0).sum(1)
        self._check_all_visible()

    @property
    def past_sinks_and_window(self) -> bool:
        """Whether the stream has passed sinks + window tokens (host-side, no sync). Before that every
        token that left the window (stream index < sinks) was a sink or padding, never written: the
        memory is still empty and some slot may still hold no real token."""
        return self.stream_len >= self.window + self.sinks

    def _check_all_visible(self) -> None:
        if not self.all_visible and self.past_sinks_and_window:
            # Checked (one sync) only until it holds; after that no slot can become hidden again.
            self.all_visible = bool((self.visible_pos() >= 0).all())

    # --- transformers Cache protocol -------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("AHNLayerCache is written by the AHN attention itself, not through update().")

    def get_seq_length(self) -> int:
        return self.stream_len

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stream_len + query_length, 0

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds (for measuring the cache size)."""
        out = [self.keys, self.values, self.ring_gates, self.slot_pos, self.real_seen, self.cursor]
        if isinstance(self.memory, ops.LogLinearState):
            out += [self.memory.slots, self.memory.position]
        elif self.memory is not None:
            out.append(self.memory)
        return [t for t in out if t is not None]

    def _map_batch(self, fn) -> None:
        for name in ("keys", "values", "ring_gates", "slot_pos", "real_seen", "cursor"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        if isinstance(self.memory, ops.LogLinearState):
            self.memory = ops.LogLinearState(fn(self.memory.slots), fn(self.memory.position))
        elif self.memory is not None:
            self.memory = fn(self.memory)

    def decode_write(self, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, pos: torch.Tensor | None = None
                     ) -> None:
        """Decode: write one token per sequence (k, v [B, Hkv, d], gates [B, H, G]; ``pos`` [B] its real
        position, -1: padding, None: a real token) into the ring slot of the token that just left, and
        into its sink slot if it is a sink, in place and with no host values involved, so the step can
        be replayed from a CUDA graph (as long as the window does not fill in it: then one host check)."""
        cache_write(self.keys, self.values, self.ring_gates, self.slot_pos, k, v, gates, self.real_seen,
                    self.cursor, self.sinks, self.window, pos)
        self.stream_len += 1
        self._check_all_visible()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def reset(self) -> None:
        self.__init__(self.window, self.sinks)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("An AHN cache cannot be cropped: evicted tokens are already in the memory.")


class AHNCache(Cache):
    """Cache for a model converted with :func:`hippolm.ahn.convert`; one layer cache per decoder layer."""

    def __init__(self, num_layers: int, window: int, sinks: int):
        validate_window(window, sinks)
        super().__init__(layers=[AHNLayerCache(window, sinks) for _ in range(num_layers)])
        self.window, self.sinks = window, sinks

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())
