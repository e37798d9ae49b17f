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
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..hf_compat import generation_config
from .cache import AHNCache


class GraphDecoder:
    """Replays captured decode steps of ``model`` on ``cache``.

    ``decoder(ids)`` with ids [B, 1] returns the logits [B, 1, vocab] of the next token; the
    returned tensor is reused by the next call (clone it to keep it). The cache must hold at
    least one token (e.g. after :meth:`AHNForCausalLM.prefill`). For each kind of step (window
    filling, window full) the first call runs eagerly (warm-up), the second captures, later ones
    replay.
    """

    def __init__(self, model, cache: AHNCache, capture: bool = True):
        if capture and (not torch.cuda.is_available() or model.device.type != "cuda"):
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
        self.capture = capture  # False: every step eager, the same inputs (what the graphs are checked against)

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
        if kind == "eager" or not self.capture:
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


# generation_config fields graph_generate has no processor for, each with its neutral values
_UNSUPPORTED = (("num_beams", (None, 1)), ("num_return_sequences", (None, 1)), ("no_repeat_ngram_size", (None, 0)),
                ("min_new_tokens", (None, 0)), ("min_length", (None, 0)), ("bad_words_ids", (None,)),
                ("suppress_tokens", (None,)), ("begin_suppress_tokens", (None,)), ("forced_bos_token_id", (None,)),
                ("forced_eos_token_id", (None,)), ("min_p", (None,)), ("typical_p", (None, 1.0)),
                ("epsilon_cutoff", (None, 0.0)), ("eta_cutoff", (None, 0.0)), ("sequence_bias", (None,)),
                ("encoder_repetition_penalty", (None, 1.0)), ("penalty_alpha", (None,)), ("stop_strings", (None,)),
                ("guidance_scale", (None, 1.0)), ("exponential_decay_length_penalty", (None,)),
                ("watermarking_config", (None,)), ("renormalize_logits", (None, False)),
                ("return_dict_in_generate", (None, False)), ("output_scores", (None, False)),
                ("output_logits", (None, False)), ("output_attentions", (None, False)),
                ("output_hidden_states", (None, False)))


def _processors(gc) -> LogitsProcessorList:
    """transformers' processors for the settings graph_generate takes, in generate's order."""
    procs = LogitsProcessorList()
    if gc.repetition_penalty not in (None, 1.0):
        procs.append(RepetitionPenaltyLogitsProcessor(gc.repetition_penalty))
    if gc.do_sample:
        if gc.temperature not in (None, 1.0):
            procs.append(TemperatureLogitsWarper(gc.temperature))
        if gc.top_k not in (None, 0):
            procs.append(TopKLogitsWarper(gc.top_k))
        if gc.top_p not in (None, 1.0):
            procs.append(TopPLogitsWarper(gc.top_p))
    return procs


@torch.no_grad()
def graph_generate(model, input_ids: torch.Tensor, cache: AHNCache, capture: bool = True, streamer=None,
                   **kwargs) -> torch.Tensor:
    """``generate``'s decoding loop with each step replayed from a CUDA graph (:class:`GraphDecoder`),
    for ``input_ids`` whose tokens but the last are in ``cache``. Greedy or sampling with the settings
    transformers' generate would resolve from ``kwargs`` (over the base's generation config and
    transformers' defaults, e.g. top_k 50 when sampling): max_new_tokens / max_length, do_sample, temperature,
    top_k, top_p, repetition_penalty, eos_token_id, pad_token_id (finished rows get pad, as
    transformers' generate); a ``streamer`` gets the prompt, then each token, as from generate.
    Returns the prompt and the new tokens, [B, T + new]. ``capture``
    False: every step eager (any device; what tests compare with transformers' generate)."""
    gc, unused = generation_config(model.base, **kwargs)
    if unused:
        raise ValueError(f"cuda_graph=True takes generation settings only; got {sorted(unused)}. Pass "
                         "cuda_graph=False for transformers' generate with those.")
    for name, neutral in _UNSUPPORTED:
        if getattr(gc, name, None) not in neutral:
            raise ValueError(f"cuda_graph=True has no support for {name}={getattr(gc, name)!r}; pass "
                             "cuda_graph=False (transformers' generate) or leave it unset.")
    steps = (gc.max_new_tokens if gc.max_new_tokens is not None
             else (gc.max_length if gc.max_length is not None else 20) - input_ids.shape[1])  # generate's default
    eos = gc.eos_token_id
    eos = None if eos is None else torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
    pad = gc.pad_token_id if gc.pad_token_id is not None else (None if eos is None else int(eos[0]))
    procs = _processors(gc)
    out, last = input_ids, input_ids[:, -1:]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    decoder = None
    for _ in range(max(steps, 0)):  # none when the prompt already fills max_length
        if cache.get_seq_length() == 0:  # nothing in the cache to capture against: this first step eagerly
            logits = model(last, cache=cache, position_ids=torch.zeros_like(last), logits_to_keep=1).logits
        else:
            decoder = decoder or GraphDecoder(model, cache, capture)
            logits = decoder(last)
        scores = procs(out, logits[:, -1].float())
        nxt = torch.multinomial(scores.softmax(-1), 1)[:, 0] if gc.do_sample else scores.argmax(-1)
        if eos is not None:
            nxt = torch.where(unfinished, nxt, pad)
            unfinished &= ~torch.isin(nxt, eos)
        out, last = torch.cat([out, nxt[:, None]], 1), nxt[:, None]
        if streamer is not None:
            streamer.put(nxt.cpu())
        if eos is not None and not bool(unfinished.any()):
            break
    if streamer is not None:
        streamer.end()
    return out
