"""Perplexity by token position on long documents, with a bounded forward.

Documents are fed in chunks through the model's cache, and the next-token log-probabilities are
computed a slice of positions at a time, so neither the attention over the whole document nor
the full-vocabulary logits of the whole document are ever held at once. The loss of the token at
position ``p`` (0-based; predicted from tokens ``0..p-1``) goes into the bucket ``lo <= p < hi``.

For an :class:`~hippolm.ahn.AHNForCausalLM`, ``window``/``sinks`` override the model's for this
call; ``window`` at least the document length gives full attention, run as one causal forward of
the whole document (the memory never receives a token) with logits still computed in slices.
Any other causal LM runs chunk by chunk with its own cache (``window`` must then be None).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..ahn import AHNForCausalLM
from ..hf_compat import cache_arg


def bucket_edges(buckets: Sequence[int]) -> list[tuple[int, int]]:
    """``[0, 2048, 8192]`` or ``[2048, 8192]`` -> ``[(0, 2048), (2048, 8192)]`` (a leading 0 is implied)."""
    edges = [int(b) for b in buckets]
    if not edges or any(b < 0 for b in edges) or any(b >= c for b, c in itertools.pairwise(edges)):
        raise ValueError(f"buckets must be increasing non-negative token positions, e.g. 0,2048,8192; got {buckets!r}.")
    if edges[0] != 0:
        edges = [0, *edges]
    if len(edges) < 2:
        raise ValueError("buckets need at least one upper edge above 0, e.g. 2048,8192.")
    return list(itertools.pairwise(edges))


def _as_docs(docs: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(docs, torch.Tensor):
        docs = [docs] if docs.ndim == 1 else list(docs.unbind(0))
    out = []
    for i, d in enumerate(docs):
        d = torch.as_tensor(d).long().reshape(-1)
        if d.numel() < 2:
            raise ValueError(f"document {i} has {d.numel()} tokens; perplexity needs at least 2.")
        out.append(d)
    if not out:
        raise ValueError("no documents given.")
    return out


def _token_nll(model, ids: torch.Tensor, *, window: int | None, sinks: int | None, chunk_size: int,
               logits_chunk: int) -> torch.Tensor:
    """Negative log-likelihood of tokens 1..T-1 of one document [T] (float64 on CPU)."""
    T = ids.numel()
    ids = ids.to(_device(model))[None]
    nll = torch.empty(T - 1, dtype=torch.float64)
    if isinstance(model, AHNForCausalLM):
        cfg = model.ahn_config
        win = cfg.window if window is None else window
        snk = cfg.sinks if sinks is None else sinks
        decoder, head = model.base.get_decoder(), model.base.get_output_embeddings()
        if win >= T:  # full attention: one causal forward (flash attention where available), logits in slices
            hidden = decoder(input_ids=ids, position_ids=torch.arange(T, device=ids.device)[None], use_cache=False,
                             ahn_window=T, ahn_sinks=0)[0][0, :-1]
            for s in range(0, T - 1, logits_chunk):
                logits = head(hidden[s:s + logits_chunk]).float()
                nll[s:s + logits.shape[0]] = F.cross_entropy(logits, ids[0, s + 1:s + 1 + logits.shape[0]],
                                                             reduction="none").double().cpu()
            return nll
        cache = model.new_cache(window=win, sinks=snk)
    else:
        if window is not None or sinks is not None:
            raise ValueError(f"window/sinks apply to AHNForCausalLM models only, not {type(model).__name__}.")
        cache = None
    for start in range(0, T - 1, chunk_size):  # the last token is never an input
        end = min(start + chunk_size, T - 1)
        chunk = ids[:, start:end]
        targets = ids[0, start + 1:end + 1]
        if isinstance(model, AHNForCausalLM):
            pos = torch.arange(start, end, device=ids.device)[None]
            hidden = decoder(input_ids=chunk, position_ids=pos, **cache_arg(cache), use_cache=True)[0][0]
            for s in range(0, end - start, logits_chunk):
                logits = head(hidden[s:s + logits_chunk]).float()
                nll[start + s:start + s + logits.shape[0]] = F.cross_entropy(
                    logits, targets[s:s + logits_chunk], reduction="none").double().cpu()
        else:
            out = model(input_ids=chunk, **cache_arg(cache), use_cache=True)
            cache = out.past_key_values
            logits = out.logits[0].float()
            nll[start:end] = F.cross_entropy(logits, targets, reduction="none").double().cpu()
    return nll


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity_by_position(model, docs: list[torch.Tensor] | torch.Tensor, buckets: Sequence[int], *,
                           window: int | None = None, sinks: int | None = None, progress: bool = True,
                           chunk_size: int = 2048, logits_chunk: int = 512) -> dict:
    """Perplexity of the tokens whose position falls in each bucket, over all documents.

    ``buckets`` are position edges (``[0, 2048, 8192, 32768]``); documents are cut at the last
    edge. Returns ``{"buckets": [[lo, hi], ...], "ppl": [...], "nll": [...], "tokens": [...],
    "overall": {"ppl", "nll", "tokens"}, "documents": n}``; a bucket no document reaches has
    ``ppl`` NaN and 0 tokens. ``chunk_size`` tokens are fed per forward, ``logits_chunk``
    positions get logits at a time (AHN models).
    """
    if chunk_size < 1 or logits_chunk < 1:
        raise ValueError("chunk_size and logits_chunk must be >= 1.")
    ranges = bucket_edges(buckets)
    limit = ranges[-1][1]
    docs = [d[:limit] for d in _as_docs(docs)]
    sums = [0.0] * len(ranges)
    counts = [0] * len(ranges)
    was_training = model.training
    model.eval()
    try:
        for doc in tqdm(docs, desc="perplexity", disable=not progress, leave=False):
            nll = _token_nll(model, doc, window=window, sinks=sinks, chunk_size=chunk_size,
                             logits_chunk=logits_chunk)
            for b, (lo, hi) in enumerate(ranges):  # nll[i] is the loss of the token at position i + 1
                part = nll[max(lo - 1, 0):max(hi - 1, 0)]
                sums[b] += float(part.sum())
                counts[b] += part.numel()
    finally:
        model.train(was_training)
    mean = [s / c if c else float("nan") for s, c in zip(sums, counts, strict=True)]
    total = sum(counts)
    overall_nll = sum(sums) / total if total else float("nan")
    return {
        "buckets": [[lo, hi] for lo, hi in ranges],
        "ppl": [math.exp(m) if c else float("nan") for m, c in zip(mean, counts, strict=True)],
        "nll": mean,
        "tokens": counts,
        "overall": {"ppl": math.exp(overall_nll) if total else float("nan"), "nll": overall_nll, "tokens": total},
        "documents": len(docs),
        "window": window,
        "sinks": sinks,
    }
