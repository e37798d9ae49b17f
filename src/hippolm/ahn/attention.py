"""Attention with a multi-store memory, swapped into a pretrained model's attention modules.

Per query token with real position p (padding excluded):
- short-term, lossless: softmax attention over keys with position < ``sinks`` or > p - ``window``;
- long-term, compressed: once p >= sinks + window, the token at p - window leaves the window and
  is written into the memory, which the query then reads (write first, read after).
The memory's per-head read-out is added to the attention output before the frozen ``o_proj``.

The same rule runs for a whole sequence at once (training, prefill) and chunk by chunk or token by
token with an :class:`~hippolm.ahn.cache.AHNCache`, so all three give the same outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..hf_compat import pick_cache
from ..ops.decode import cache_attention, decode_attention
from .cache import AHNCache, AHNLayerCache
from .config import validate_window


def _select_state(state, idx: torch.Tensor):
    if isinstance(state, ops.LogLinearState):
        return ops.LogLinearState(state.slots[idx], state.position[idx])
    return state[idx]


def _scatter_state(state, idx: torch.Tensor, part):
    if isinstance(state, ops.LogLinearState):
        slots, pos = state.slots.clone(), state.position.clone()
        slots[idx], pos[idx] = part.slots.to(slots.dtype), part.position
        return ops.LogLinearState(slots, pos)
    out = state.clone()
    out[idx] = part.to(out.dtype)
    return out


class AHNAttentionMixin:
    """Mixed into the class of each attention module by :func:`hippolm.ahn.convert`.

    Uses the module's own ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (and ``q_norm``/``k_norm``
    where the family has them) and the family's ``apply_rotary_pos_emb``; adds ``self.ahn``.
    """

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                cache=None, **kwargs):
        store = pick_cache(cache, past_key_values)  # the decoder layer passes it as ``cache`` from transformers 5.25
        B, T, _ = hidden_states.shape
        d = self.head_dim
        q = self.q_proj(hidden_states).view(B, T, -1, d)
        # k, v and the memory's gate projections (all of the normed hidden state) in one matmul
        (k, v), raw_gates = self.ahn.projections(hidden_states, (self.k_proj, self.v_proj))
        k, v = k.reshape(B, T, -1, d), v.reshape(B, T, -1, d)
        if T > 1:  # v is a strided slice of that output, which SDPA's memory-efficient CUDA kernel can get
            # wrong (pytorch#112577; bf16, 152-byte rows of a tiny test config: 3.5 off); decode needs no copy
            v = v.contiguous()
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self.ahn_rope(q, k, cos, sin)

        asked_window, asked_sinks = kwargs.get("ahn_window"), kwargs.get("ahn_sinks")
        window = self.ahn_config.window if asked_window is None else asked_window
        sinks = self.ahn_config.sinks if asked_sinks is None else asked_sinks
        if isinstance(store, AHNCache):
            cache = store.layers[self.layer_idx]
            if asked_window not in (None, cache.window) or asked_sinks not in (None, cache.sinks):
                asked = ", ".join(f"{n}={v}" for n, v in (("window", asked_window), ("sinks", asked_sinks))
                                  if v is not None)
                raise ValueError(f"this cache was made for window={cache.window}, sinks={cache.sinks}; "
                                 f"got {asked}. Start a new cache to change them.")
            window, sinks = cache.window, cache.sinks
            persistent = True
            levels = self.ahn.levels
            if levels and cache.stream_len + T - window - sinks > 1 << (levels - 1):  # host-side: no sync
                raise ValueError(f"the log-linear memory's {levels} levels hold {1 << (levels - 1)} tokens past the "
                                 "window; this context is longer. Convert with more levels (from_base(levels=...)).")
        elif store is None:
            validate_window(window, sinks)
            cache, persistent = AHNLayerCache(window, sinks), False
        else:
            got = type(store).__name__
            raise ValueError(f"an AHN model needs an AHNCache (model.new_cache()), got {got}.")

        write_gates, out_gate, lam = self.ahn.gates_from(raw_gates, k.dtype)
        real = kwargs.get("ahn_attention_mask")
        if persistent and T == 1 and cache.stream_len > 0:
            pos = None if real is None else torch.where(real[:, -1].to(q.device, torch.bool), cache.real_seen, -1)
            return self.o_proj(self._ahn_fused_decode(q, k, v, write_gates, out_gate, lam, cache, pos)), None

        padded = real is not None
        real = (torch.ones(B, T, dtype=torch.bool, device=q.device) if real is None
                else real[:, -T:].to(device=q.device, dtype=torch.bool))
        if persistent and not cache.is_initialized:
            cache.lazy_initialization(k, v, write_gates)
            cache.memory = self.ahn.empty_state(B, q.device)  # allocated up front: the cache never grows
        seen = cache.real_seen if persistent else torch.zeros(B, dtype=torch.long, device=q.device)
        pos = torch.where(real, seen[:, None] + real.long().cumsum(1) - 1, -1)  # real positions, -1: padding
        has_past = persistent and cache.stream_len > 0

        out = self._ahn_long_term(q, k, v, write_gates, pos, (out_gate, lam), cache, has_past, persistent, window,
                                  sinks)
        if not has_past and not padded and window >= T:  # plain causal attention (e.g. the teacher)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                               enable_gqa=q.shape[1] != k.shape[1])
            out = out + o.transpose(1, 2)
        else:
            out = out + self._ahn_short_term(q, k, v, pos, cache if has_past else None, window, sinks)
        if persistent:
            cache.append(k, v, write_gates, pos)
        return self.o_proj(out.reshape(B, T, -1)), None

    def _ahn_fused_decode(self, q, k, v, write_gates, out_gate, lam, cache: AHNLayerCache,
                          pos: torch.Tensor | None = None) -> torch.Tensor:
        """One token per sequence (``pos`` [B] its real position, -1: padding; None: a real token)
        through the fused memory step: the token in the slot the new one takes leaves the window and
        is written into the memory, the new token is written, then the query reads the memory and
        attends to the buffer. Every index is a device tensor and every state update in place: no host
        syncs, and CUDA-graph replayable.

        Wherever no real token leaves, the slot taken holds zeros or a token stored with zero write
        gates (padding, sinks: see cache_write), so the step leaves the state as it is (a log-linear
        memory, whose Fenwick position must not advance, takes no step there: the slot's position
        says so). Until the stream passes sinks + window tokens (:attr:`AHNLayerCache.past_sinks_and_window`,
        host-side, fixed for a captured graph of this kind of step) the memory is still empty, reads
        zero and is not run at all. The attention reads only the filled slots, visible by their
        positions."""
        B = q.shape[0]
        mem = None
        if cache.past_sinks_and_window:
            mem = self.ahn.decode_step(q[:, :, 0], cache.keys, cache.values, cache.ring_gates, cache.cursor,
                                       cache.sinks, cache.window, out_gate[:, 0], None if lam is None else lam[:, 0],
                                       cache.memory, cache.slot_pos)
        full = cache.all_visible  # before the write: a write that fills the window checks it on the host
        cache.decode_write(k[:, :, 0], v[:, :, 0], write_gates[:, 0], pos)
        if full:
            return decode_attention(q[:, :, 0], cache.keys, cache.values, self.scaling, add=mem).reshape(B, 1, -1)
        return self._ahn_decode_attention(q, pos, cache, add=mem).reshape(B, 1, -1)

    def _ahn_decode_attention(self, q, pos, cache: AHNLayerCache, add=None):
        """One query per sequence over the sinks + window buffer (the new token already in it), plus
        ``add`` [B, H, d] (the memory's read-out) if given; ``pos`` [B] or [B, 1] or None (real)."""
        qpos = None if pos is None else pos.reshape(-1)
        return cache_attention(q[:, :, 0], cache.keys, cache.values, cache.slot_pos, cache.cursor, cache.sinks,
                               cache.window, self.scaling, qpos, add)[:, None]

    def _ahn_short_term(self, q, k, v, pos, cache: AHNLayerCache | None, window: int, sinks: int):
        """Softmax attention over sinks + window, as one SDPA call with a boolean mask."""
        T = q.shape[2]
        if cache is not None:
            ck = torch.cat([cache.keys, k], 2)
            cv = torch.cat([cache.values, v], 2)
            cpos = torch.cat([cache.visible_pos(), pos], 1)
        else:
            ck, cv, cpos = k, v, pos
        n_old = ck.shape[2] - T
        kp, qp = cpos[:, None, :], pos[:, :, None]
        mask = (kp >= 0) & ((kp < sinks) | (qp - kp < window))
        causal = torch.ones(T, n_old + T, dtype=torch.bool, device=q.device).tril(n_old)
        diag = torch.zeros_like(causal)
        diag[:, n_old:] = torch.eye(T, dtype=torch.bool, device=q.device)
        # Padding queries see only themselves (their outputs are ignored), so no row is empty.
        mask = (mask & causal) | (diag & (qp < 0))
        o = F.scaled_dot_product_attention(q, ck, cv, attn_mask=mask[:, None], scale=self.scaling,
                                           enable_gqa=q.shape[1] != ck.shape[1])
        return o.transpose(1, 2)  # [B, T, H, d]

    def _ahn_long_term(self, q, k, v, write_gates, pos, read_gates, cache, has_past, persistent, window, sinks):
        """Write each token leaving the window into the memory, then read it with the query (a
        decode step with a past takes :meth:`_ahn_fused_decode` instead)."""
        B, H, T, _ = q.shape
        zero = torch.zeros_like(q).transpose(1, 2)
        if T == 1 and not has_past:  # one token and nothing before it: nothing leaves the window yet
            return zero
        if has_past:
            rk, rv, rg, rpos = cache.ring_in_stream_order()
            src = [torch.cat([a, b], 2)[:, :, :T] for a, b in ((rk, k), (rv, v))]
            src_gates = torch.cat([rg, write_gates], 1)[:, :T]
            src_pos = torch.cat([rpos, pos], 1)[:, :T]
        else:  # the token leaving at query t is the one `window` stream steps earlier
            src = [F.pad(a, (0, 0, window, 0))[:, :, :T] for a in (k, v)]
            src_gates = F.pad(write_gates, (0, 0) * (write_gates.ndim - 2) + (window, 0))[:, :T]
            src_pos = F.pad(pos, (window, 0), value=-1)[:, :T]
        valid = src_pos >= sinks  # [B, T]: a real, non-sink token leaves the window here
        if not bool(valid.any()):
            return zero
        n_valid = valid.sum(1)
        if not bool((valid == (torch.arange(T, device=q.device)[None] >= (T - n_valid)[:, None])).all()):
            raise ValueError("AHN models take left padding only: attention_mask must be 0s then 1s per sequence.")
        rep = H // src[0].shape[1]
        km, vm = (a.repeat_interleave(rep, 1).transpose(1, 2) for a in src)  # GQA-expanded [B, T, H, d]
        qm = q.transpose(1, 2)
        out_gate, lam = read_gates
        state = cache.memory if persistent else self.ahn.empty_state(B, q.device)
        first = T - n_valid
        if bool((first == first[0]).all()):
            f = int(first[0])
            o_part, state = self.ahn.sequence(qm[:, f:], km[:, f:], vm[:, f:], src_gates[:, f:],
                                              None if lam is None else lam[:, f:], state)
            o = torch.cat([zero[:, :f], o_part], 1)
        else:  # pack each sequence's stepping suffix; sequences that do not step keep their state
            idx = (n_valid > 0).nonzero().squeeze(1)
            flat = lambda a: a[valid].unsqueeze(0)  # noqa: E731
            cu = F.pad(n_valid[idx].cumsum(0), (1, 0))
            o_part, part = self.ahn.sequence(flat(qm), flat(km), flat(vm), flat(src_gates),
                                             None if lam is None else flat(lam), _select_state(state, idx), cu)
            o = zero.clone()
            o[valid] = o_part[0]
            state = _scatter_state(state, idx, part)
        if persistent:
            cache.memory = state
        return self.ahn.readout(o, out_gate)  # exactly 0 where nothing was read (Norm(0) = 0)
