"""Distillation loss computed from final hidden states in chunks of positions.

Full-vocabulary logits of every position at once would not fit for long sequences (150k vocab x
24k positions x 4 bytes = 14 GB per logits tensor), so the output head runs on ``chunk`` positions
at a time inside :func:`torch.utils.checkpoint.checkpoint`: the forward keeps only each chunk's
scalar loss, and the backward recomputes one chunk's logits at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 logits lose too much in the softmax)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_sums(head: Callable[[torch.Tensor], torch.Tensor], hs: torch.Tensor, ht: torch.Tensor,
                labels: torch.Tensor, temperature: float, with_ce: bool) -> torch.Tensor:
    """(sum of KL(teacher || student) over the rows, sum of CE over rows with a label >= 0)."""
    s = _upcast(head(hs))
    with torch.no_grad():
        log_pt = F.log_softmax(_upcast(head(ht)) / temperature, -1)
    log_ps = F.log_softmax(s / temperature, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum()
    if not with_ce:
        return torch.stack([kl, kl.new_zeros(())])
    ce = F.cross_entropy(s, labels.clamp_min(0), reduction="none")
    return torch.stack([kl, (ce * (labels >= 0)).sum()])


def distill_loss(head: Callable[[torch.Tensor], torch.Tensor], student_hidden: torch.Tensor,
                 teacher_hidden: torch.Tensor, start: int, *, labels: torch.Tensor | None = None,
                 temperature: float = 1.0, ce_weight: float = 0.0, chunk: int | None = 1024,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss over positions ``start:`` of ``[B, T, D]`` hidden states.

    ``kl`` = mean over positions of ``temperature**2 * KL(softmax(t / tau) || softmax(s / tau))``
    (forward KL, teacher first); ``ce`` = mean cross-entropy of the student's (untempered) logits
    on ``labels`` (``[B, T]`` next-token ids, -1 where there is none); the loss is
    ``(1 - ce_weight) * kl + ce_weight * ce``. ``chunk`` rows of ``B * (T - start)`` at a time
    (``None``: all at once, no checkpointing).
    """
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must lie in [0, 1], got {ce_weight}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    T, D = student_hidden.shape[1:]
    if not 0 <= start < T:
        raise ValueError(f"no position to train on: start {start} with sequence length {T}.")
    hs = student_hidden[:, start:].reshape(-1, D)
    ht = teacher_hidden[:, start:].reshape(-1, D).detach()
    with_ce = ce_weight > 0
    if with_ce:
        if labels is None:
            raise ValueError("ce_weight > 0 needs labels.")
        lab = labels[:, start:].reshape(-1)
    else:
        lab = torch.full((hs.shape[0],), -1, dtype=torch.long, device=hs.device)
    n = hs.shape[0]
    step = n if not chunk else int(chunk)
    total = hs.new_zeros(2, dtype=torch.promote_types(hs.dtype, torch.float32))
    for a in range(0, n, step):
        b = min(a + step, n)
        args = (head, hs[a:b], ht[a:b], lab[a:b], temperature, with_ce)
        if chunk and hs.requires_grad:
            total = total + checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            total = total + _chunk_sums(*args)
    kl = total[0] / n * temperature**2
    ce = total[1] / (lab >= 0).sum().clamp_min(1) if with_ce else total[1]
    loss = (1.0 - ce_weight) * kl + ce_weight * ce if with_ce else kl
    return loss, {"kl": kl.detach(), "ce": ce.detach()}


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """``labels[:, p] = ids[:, p + 1]``; -1 at the last position."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], 1)
