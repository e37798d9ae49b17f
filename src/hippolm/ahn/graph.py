"""Decoding from a CUDA graph: one replay per token instead of hundreds of kernel launches.

An AHN decode step past the window has a fixed shape and touches only fixed buffers (every
index is a device tensor, every state update in place), so it is captured once and replayed.
At batch sizes where the step is launch-bound (small models, or large ones on a fast GPU) this
is what makes decode time track the bytes it moves.
"""

from __future__ import annotations

import torch

from .cache import AHNCache


class GraphDecoder:
    """Replays one captured decode step of ``model`` on ``cache``.

    ``decoder(ids)`` with ids [B, 1] returns the logits [B, 1, vocab] of the next token; the
    returned tensor is reused by the next call (clone it to keep it). The cache must be past
    its window (every slot filled by a real token), e.g. after :meth:`AHNForCausalLM.prefill`.
    The first call runs eagerly (warm-up), the second captures, later ones replay.
    """

    def __init__(self, model, cache: AHNCache):
        if not torch.cuda.is_available() or model.device.type != "cuda":
            raise ValueError("GraphDecoder needs the model on a CUDA device; on CPU call the model directly.")
        if not all(layer.is_initialized and layer.all_visible for layer in cache.layers):
            raise ValueError("GraphDecoder needs a cache past its window (prefill at least window + sinks "
                             "tokens first); before that, decode by calling the model.")
        self.model, self.cache = model, cache
        B = cache.layers[0].real_seen.shape[0]
        dev = model.device
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.position_ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.calls = 0

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
        self.calls += 1
        if self.calls == 1:  # warm-up on a side stream, as torch.cuda.graphs asks
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self._step()
            torch.cuda.current_stream().wait_stream(stream)
            return logits
        if self.graph is None:
            # Capturing records kernels without running them, but the Python side of the step runs:
            # undo its host-side counters, then replay to actually take the step.
            lengths = [layer.stream_len for layer in self.cache.layers]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
            for layer, n in zip(self.cache.layers, lengths, strict=True):
                layer.stream_len = n
        self.graph.replay()
        for layer in self.cache.layers:
            layer.stream_len += 1
        return self.logits
