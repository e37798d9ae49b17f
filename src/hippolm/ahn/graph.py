"""Decoding from a CUDA graph: one replay per token instead of hundreds of kernel launches.

An AHN decode step has a fixed shape and touches only fixed buffers (every slot index comes from
the cache's device cursor, every state update is in place), so it is captured once and replayed.
Two steps exist: while sinks and window are still filling (masked attention; the linear memories'
fused step, a no-op on the state where no real token leaves; log-linear memories' writes masked)
and once every slot holds a real token (no masks); each gets its own graph. The step
that finds the window full reads one flag on the host, so the few steps around that boundary
run eagerly. At batch sizes where the step is launch-bound (small models, or large ones on a
fast GPU) this is what makes decode time track the bytes it moves.
"""

from __future__ import annotations

import torch

from .cache import AHNCache


class GraphDecoder:
    """Replays captured decode steps of ``model`` on ``cache``.

    ``decoder(ids)`` with ids [B, 1] returns the logits [B, 1, vocab] of the next token; the
    returned tensor is reused by the next call (clone it to keep it). The cache must hold at
    least one token (e.g. after :meth:`AHNForCausalLM.prefill`). For each kind of step (window
    filling, window full) the first call runs eagerly (warm-up), the second captures, later ones
    replay.
    """

    def __init__(self, model, cache: AHNCache):
        if not torch.cuda.is_available() or model.device.type != "cuda":
            raise ValueError("GraphDecoder needs the model on a CUDA device; on CPU call the model directly.")
        if not all(layer.is_initialized and layer.stream_len > 0 for layer in cache.layers):
            raise ValueError("GraphDecoder needs a cache holding at least one token (prefill the prompt first).")
        self.model, self.cache = model, cache
        B = cache.layers[0].real_seen.shape[0]
        dev = model.device
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.position_ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=dev)
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.warmed: set[str] = set()

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The graph of the window-full step (None until captured)."""
        return self.graphs.get("full")

    def _kind(self) -> str:
        """'full' (every slot real), 'filling' (captured: the step cannot complete the window), or
        'eager' (a step that may complete it: its cache write checks, on the host, whether it did)."""
        layers = self.cache.layers
        if all(layer.all_visible for layer in layers):
            return "full"
        first = layers[0]
        return "filling" if first.stream_len + 1 < first.window + first.sinks else "eager"

    def _step(self) -> torch.Tensor:
        out = self.model(self.ids, past_key_values=self.cache, position_ids=self.position_ids,
                         cache_position=self.cache_position, logits_to_keep=1)
        return out.logits

    def _load_inputs(self, ids: torch.Tensor) -> None:
        self.ids.copy_(ids)
        self.position_ids.copy_(self.cache.layers[0].real_seen[:, None])  # device to device: no sync
        self.cache_position.copy_(self.cache.layers[0].cursor[:1])

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape != self.ids.shape:
            raise ValueError(f"ids must have shape {tuple(self.ids.shape)} (the cache's batch, one token), "
                             f"got {tuple(ids.shape)}.")
        self._load_inputs(ids)
        kind = self._kind()
        if kind == "eager":
            return self._step()
        if kind not in self.warmed:  # warm-up on a side stream, as torch.cuda.graphs asks
            self.warmed.add(kind)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self._step()
            torch.cuda.current_stream().wait_stream(stream)
            return logits
        if kind not in self.graphs:
            # Capturing records kernels without running them, but the Python side of the step runs:
            # undo its host-side counters, then replay to actually take the step.
            lengths = [layer.stream_len for layer in self.cache.layers]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outputs[kind] = self._step()
            self.graphs[kind] = graph
            for layer, n in zip(self.cache.layers, lengths, strict=True):
                layer.stream_len = n
        self.graphs[kind].replay()
        for layer in self.cache.layers:
            layer.stream_len += 1
        return self.outputs[kind]
