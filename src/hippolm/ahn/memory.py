"""The long-term memory module of one decoder layer (the Artificial Hippocampus Network).

It has no q/k/v projections of its own: it compresses the layer's own RoPE'd keys and values
(GQA-expanded to every query head) of tokens leaving the sliding window, and is read with the
layer's own queries. Write gates come from the input-normed hidden state of the evicted token,
read gates (output gate, log-linear level weights) from that of the current token. The read-out
``o_proj(Norm(S^T q) * silu(gate(x_t)))`` is block-diagonal per head and zero-initialised, so an
untrained memory adds exactly nothing.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..layers.common import decay_init
from ..ops import reference
from ..ops.decode import loglinear_step_from_cache_, memory_step_from_cache
from ..ops.loglinear import step_unchecked
from .config import MEMORY_TYPES

State = torch.Tensor | ops.LogLinearState


class MemoryModule(nn.Module):
    def __init__(self, kind: str, hidden_size: int, num_heads: int, head_dim: int, levels: int = 21,
                 eps: float = 1e-6):
        super().__init__()
        if kind not in MEMORY_TYPES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_TYPES)}, got {kind!r}.")
        self.kind, self.num_heads, self.head_dim, self.eps = kind, num_heads, head_dim, eps
        self.base_kind = kind.removeprefix("loglinear_")
        self.levels = levels if kind.startswith("loglinear_") else 0
        H = num_heads
        if self.base_kind in ("gdn", "mamba2"):
            # Decay a = exp(-exp(A_log) * softplus(a_proj(x) + dt_bias)), initialised as Mamba-2:
            # A ~ U(1, 16), dt log-uniform in [1e-3, 0.1].
            self.a_proj = nn.Linear(hidden_size, H, bias=False)
            A_log, dt_bias = decay_init(H)
            self.A_log, self.dt_bias = nn.Parameter(A_log), nn.Parameter(dt_bias)
        if self.base_kind in ("gdn", "deltanet"):
            self.b_proj = nn.Linear(hidden_size, H, bias=False)
        self.g_proj = nn.Linear(hidden_size, H, bias=False)  # scalar output gate per head
        self.norm_weight = nn.Parameter(torch.ones(head_dim))
        self.o_proj = nn.Parameter(torch.zeros(H, head_dim, head_dim))  # block-diagonal, zero init
        if self.levels:
            self.lam_proj = nn.Linear(hidden_size, H * self.levels, bias=False)
            nn.init.zeros_(self.lam_proj.weight)  # all levels equal: starts as the linear memory
            self.lam_scale = nn.Parameter(torch.ones(H, self.levels))
            self.lam_scale._no_weight_decay = True

    def _gate_layers(self) -> list[tuple[str, nn.Linear]]:
        names = [n for n in ("a_proj", "b_proj", "g_proj", "lam_proj") if hasattr(self, n)]
        return [(n, getattr(self, n)) for n in names]

    def _fused(self, layers: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight (and bias: zeros for the bias-free rows) of ``layers`` followed by every gate
        projection, concatenated. Outside autograd the concatenation is kept until a parameter
        changes (their version counters)."""
        rows = [*layers, *(layer for _, layer in self._gate_layers())]
        params = [p for layer in rows for p in (layer.weight, layer.bias) if p is not None]

        def build():
            bias = None
            if any(layer.bias is not None for layer in rows):
                bias = torch.cat([layer.weight.new_zeros(layer.out_features) if layer.bias is None else layer.bias
                                  for layer in rows])
            return torch.cat([layer.weight for layer in rows]), bias

        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return build()
        cache = self.__dict__.setdefault("_fused_cache", {})
        name = tuple(id(layer) for layer in layers)
        kept = cache.get(name)
        # Weak references, not addresses: a parameter replaced by a new one (even at the same address,
        # with the same version count) does not match; an in-place update bumps the version; Module.to()
        # swaps p.data (new storage, dtype or device) and bumps nothing, so that is compared too
        def key(p):
            return p._version, p.data_ptr(), p.dtype, p.device

        if kept is None or len(kept[0]) != len(params) or any(
                ref() is not p or k != key(p) for (ref, k), p in zip(kept[0], params, strict=True)):
            kept = cache[name] = ([(weakref.ref(p), key(p)) for p in params], build())
        return kept[1]

    def projections(self, x: torch.Tensor, layers: tuple[nn.Linear, ...] = ()
                    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """(outputs of ``layers``, raw gate projections by name) of x [..., D]: one matmul where all
        weights share the memory's dtype (the attention passes its frozen k/v projections: in a
        batch-8 decode step each small matmul costs a launch and a latency-bound pass over its weights)."""
        names = [n for n, _ in self._gate_layers()]
        gate_dtype = self._gate_layers()[0][1].weight.dtype
        # Plain layers of the memory's dtype only: not e.g. a float32 memory on a bf16 base, a quantised
        # or adapter-wrapped projection, or one whose weights hooks bring in (offloading)
        if any(type(layer) is not nn.Linear or layer.weight.dtype != gate_dtype or layer._forward_hooks
               or layer._forward_pre_hooks for layer in layers):
            return [layer(x) for layer in layers], self.projections(x)[1]
        w, b = self._fused(tuple(layers))
        y = F.linear(x.to(w.dtype), w, b)
        sizes = [layer.out_features for layer in layers] + [layer.out_features for _, layer in self._gate_layers()]
        parts = y.split(sizes, -1)
        return list(parts[: len(layers)]), dict(zip(names, parts[len(layers):], strict=True))

    @property
    def num_write_gates(self) -> int:
        return {"gdn": 2, "mamba2": 2, "deltanet": 1}[self.base_kind]

    def write_gates(self, raw: dict[str, torch.Tensor], store_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Gates of tokens as they will be written, [..., H, G] float32, from :meth:`projections`
        of their normed hidden states; rounded through ``store_dtype`` (the cache's) so training and
        decoding use the same values."""
        gates = []
        if self.base_kind in ("gdn", "mamba2"):
            dt = F.softplus(raw["a_proj"].float() + self.dt_bias.float())
            gates.append(-self.A_log.float().exp() * dt)  # log decay
            if self.base_kind == "mamba2":
                gates.append(dt)  # write strength: h <- a h + dt k v^T
        if self.base_kind in ("gdn", "deltanet"):
            gates.append(torch.sigmoid(raw["b_proj"].float()))
        out = torch.stack(gates, -1)
        return out if store_dtype is None else out.to(store_dtype).float()

    def read_gates(self, raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output gate [..., H], level weights [..., H, L] or None) of the reading tokens."""
        lam = None
        if self.levels:
            lam = F.softplus(self.lam_scale.float() * raw["lam_proj"].float().unflatten(-1, (self.num_heads,
                                                                                            self.levels)))
        return raw["g_proj"], lam

    def gates(self, x: torch.Tensor, store_dtype: torch.dtype | None = None):
        """(write gates, output gate, level weights) of x [..., D] from one projection."""
        return self.gates_from(self.projections(x)[1], store_dtype)

    def gates_from(self, raw: dict[str, torch.Tensor], store_dtype: torch.dtype | None = None):
        """(write gates, output gate, level weights) from raw projections (:meth:`projections`)."""
        return (self.write_gates(raw, store_dtype), *self.read_gates(raw))

    def _op_args(self, k, v, wg):
        if self.base_kind == "gdn":
            return (k, v, wg[..., 0], wg[..., 1])
        if self.base_kind == "deltanet":
            return (k, v, wg[..., 0])
        return ((k * wg[..., 1:2]).to(k.dtype), v, wg[..., 0])

    def empty_state(self, batch: int, device, dtype=torch.float32) -> State:
        H, d = self.num_heads, self.head_dim
        if self.levels:
            return ops.LogLinearState(torch.zeros(batch, H, self.levels, d, d, device=device, dtype=dtype),
                                      torch.zeros(batch, dtype=torch.long, device=device))
        return torch.zeros(batch, H, d, d, device=device, dtype=dtype)

    def sequence(self, q, k, v, wg, lam, state: State | None, cu_seqlens=None) -> tuple[torch.Tensor, State]:
        """Write tokens and read after each write: q, k [B, T, H, d], v [B, T, H, d], wg [B, T, H, G]."""
        # Under autocast normalize returns float32: keep q, k in v's dtype as the ops require.
        q, k = F.normalize(q, dim=-1).to(v.dtype), F.normalize(k, dim=-1).to(v.dtype)
        args = self._op_args(k, v, wg)
        kw = dict(initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)
        if self.base_kind == "gdn":
            fn = ops.loglinear_gated_delta_rule if self.levels else ops.gated_delta_rule
        elif self.base_kind == "mamba2":
            fn = ops.loglinear_ssd if self.levels else ops.ssd
        else:
            fn = ops.delta_rule
        return fn(q, *args, lam, **kw) if self.levels else fn(q, *args, **kw)

    def _step_args(self, q, k, v, wg) -> tuple:
        """(q, k, v, g, beta) of one step as the ops take them (normalised q, k; g or beta None where
        the memory has none)."""
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        k, v, *gates = self._op_args(k, v, wg)
        g = gates[0] if self.base_kind != "deltanet" else None
        beta = gates[-1] if self.base_kind != "mamba2" else None
        return q, k, v, g, beta

    def step(self, q, k, v, wg, lam, state: State | None) -> tuple[torch.Tensor, State]:
        """One write + read per sequence: q, k [B, H, d], v [B, H, d], wg [B, H, G]."""
        args = self._step_args(q, k, v, wg)
        # Unchecked step forms: inputs are ours, and each check would cost a device sync per token.
        if self.levels:
            return step_unchecked(*args, lam, state, None, check_levels=False)
        return reference.step(*args, state)

    def readout(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Per-head contribution [..., H, d] to add to the attention output before the frozen o_proj."""
        of = o.float()
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        return self._project(of * F.silu(gate.float())[..., None], o.dtype)

    def _project(self, normed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.einsum("...hd,hde->...he", normed.to(self.o_proj.dtype), self.o_proj).to(dtype)

    def decode_step(self, q, keys, values, ring_gates, cursor, sinks: int, window: int, gate, lam,
                    state: State, slot_pos: torch.Tensor) -> torch.Tensor:
        """Decode: write the token leaving the window of an AHN cache (read from its ring slot at stream
        index ``cursor`` [B]) and read with q [B, H, d], updating ``state`` in place; returns the
        per-head contribution [B, H, d] (float32). gate [B, H], lam: the reading token's
        :meth:`read_gates`. On CUDA one fused kernel for the linear memories
        (:func:`hippolm.ops.decode.memory_step_from_cache`: cache read, step, read-out; where nothing
        leaves, the slot's zero write gates make the step a no-op) and one for the log-linear step
        (:func:`hippolm.ops.decode.loglinear_step_from_cache_`: cache read and step; the read-out is
        torch), which ``slot_pos`` (the cache's slot positions) tells where nothing leaves (no real
        token past the sinks in the slot): there it takes no step, as its Fenwick position must not
        advance."""
        g_idx = -1 if self.base_kind == "deltanet" else 0
        beta_idx = 0 if self.base_kind == "deltanet" else 1
        if self.levels:
            o = loglinear_step_from_cache_(q, keys, values, ring_gates, slot_pos, cursor, sinks, window, g_idx,
                                           -1 if self.base_kind == "mamba2" else beta_idx,
                                           1 if self.base_kind == "mamba2" else -1, lam, state)
            return self.readout(o, gate)
        return memory_step_from_cache(q, keys, values, ring_gates, cursor, sinks, window, g_idx, beta_idx,
                                      self.base_kind != "mamba2", state, self.norm_weight, gate, self.eps,
                                      o_proj=self.o_proj)
