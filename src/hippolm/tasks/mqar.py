"""Multi-query associative recall (MQAR, as in Zoology): data generator, training and evaluation.

A sequence starts with ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys distinct, from the
lower half of the vocabulary without token 0; values distinct, from the upper half). The rest is
random filler in which every key is queried once: query slots are the even offsets after the
context, drawn without replacement with probability ~ (slot + 1)^(power_a - 1) (a power law, so
most queries come soon after the context and a few far away). The target at a query position is
the value paired with that key; every other target is -100. Accuracy is the fraction of queries
whose argmax prediction is the value.
"""

from __future__ import annotations

import datetime
import json
import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..layers.common import A_INIT_RANGE
from ..models import HippoConfig, HippoForCausalLM
from ..runtime import pick_device

IGNORE = -100


def _distinct(num_examples: int, pool: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` distinct integers from [0, pool) per row, in random order: [num_examples, count]."""
    rows = max(1, (1 << 23) // pool)  # bound the random matrix to ~32 MB
    parts = [torch.rand(min(rows, num_examples - i), pool, generator=gen).topk(count, dim=1).indices
             for i in range(0, num_examples, rows)]
    return torch.cat(parts) if parts else torch.empty(0, count, dtype=torch.long)


def _check_fits(seq_len: int, num_pairs: int, vocab_size: int) -> None:
    """A ValueError unless ``num_pairs`` distinct pairs and their queries fit the sequence and vocabulary."""
    if seq_len < 4 * num_pairs:
        raise ValueError(f"seq_len {seq_len} is too short for {num_pairs} pairs: the context takes 2 tokens a pair "
                         f"and each query 2 more, so seq_len must be >= 4 * num_pairs = {4 * num_pairs}.")
    if vocab_size // 2 - 1 < num_pairs:
        raise ValueError(f"vocab_size {vocab_size} has too few keys for {num_pairs} distinct pairs "
                         f"(it must be >= {2 * num_pairs + 2}).")


def mqar_data(num_examples: int, seq_len: int, num_pairs: int, *, vocab_size: int = 8192, seed: int = 0,
              power_a: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_examples`` MQAR sequences: (inputs [N, seq_len], targets [N, seq_len]) int64 on CPU.

    Deterministic in ``seed`` (a private generator; global RNG untouched).
    """
    if num_pairs < 1 or num_examples < 1:
        raise ValueError(f"num_pairs and num_examples must be >= 1, got {num_pairs} and {num_examples}.")
    _check_fits(seq_len, num_pairs, vocab_size)
    half = vocab_size // 2
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a must be in (0, 1], got {power_a}.")
    gen = torch.Generator().manual_seed(seed)
    n, ctx = num_pairs, 2 * num_pairs
    keys = _distinct(num_examples, half - 1, n, gen) + 1  # [1, half): token 0 is never a key
    values = _distinct(num_examples, vocab_size - half, n, gen) + half
    inputs = torch.randint(0, vocab_size, (num_examples, seq_len), generator=gen)  # filler
    inputs[:, 0:ctx:2], inputs[:, 1:ctx:2] = keys, values
    slots = (seq_len - ctx) // 2
    weight = torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weight.expand(num_examples, slots), n, replacement=False, generator=gen)
    query_pos = ctx + 2 * gaps  # key i is queried at query_pos[:, i]
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full_like(inputs, IGNORE).scatter_(1, query_pos, values)
    return inputs, targets


def _seed(*parts: object) -> int:
    """A stable seed per (purpose, setting): datasets differ between train/eval and pair counts."""
    return zlib.crc32(repr(parts).encode())


# --- training ------------------------------------------------------------------------------------


@dataclass
class MQARSettings:
    """One MQAR training run. ``train_examples`` are split evenly over ``pairs``."""

    mixer: str = "gdn"
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 1
    expand_v: int = 1
    state_size: int | None = None
    window: int = 64  # span of 'swa' layers only; 'attention' is full causal attention
    a_init_range: tuple[float, float] = A_INIT_RANGE  # recurrent layers' A ~ U(lo, hi) at init
    seq_len: int = 256
    pairs: tuple[int, ...] = (4, 8, 16, 32, 64)
    vocab_size: int = 8192
    train_examples: int = 20_000
    eval_examples: int = 500
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    seed: int = 0
    device: str = "auto"
    time_limit: float | None = None  # seconds of training: stop there (recorded); the schedule follows time too

    def check(self) -> None:
        """A ValueError naming the first setting that cannot train (before any data or model is made)."""
        for name in ("d_model", "num_layers", "num_heads", "expand_v", "seq_len", "vocab_size", "train_examples",
                     "eval_examples", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not self.pairs or min(self.pairs) < 1:
            raise ValueError(f"pairs must be numbers >= 1, got {self.pairs}.")
        _check_fits(self.seq_len, max(self.pairs), self.vocab_size)
        if not (math.isfinite(self.lr) and self.lr > 0) or not (math.isfinite(self.weight_decay)
                                                                  and self.weight_decay >= 0):
            raise ValueError(f"lr must be > 0 and weight_decay >= 0 (finite), got {self.lr} and {self.weight_decay}.")
        self.model_config()  # the model's own checks (head split, window of swa layers, ...)
        pick_device(self.device)

    def model_config(self) -> HippoConfig:
        return HippoConfig(vocab_size=self.vocab_size, hidden_size=self.d_model, num_hidden_layers=self.num_layers,
                           num_attention_heads=self.num_heads, expand_v=self.expand_v, state_size=self.state_size,
                           mixer=self.mixer, window=self.window, max_position=self.seq_len,
                           A_init_range=tuple(self.a_init_range))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on gains, biases, decay rates, level scales (parameters marked _no_weight_decay).
    decay, keep = [], []
    for p in model.parameters():
        (keep if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def _query_logits(model: HippoForCausalLM, inputs: torch.Tensor, targets: torch.Tensor):
    """Logits at query positions only (the full [B, T, vocab] tensor would dominate memory)."""
    hidden = model.model(inputs)
    mask = targets != IGNORE
    return model.lm_head(hidden[mask]), targets[mask]


@torch.no_grad()
def evaluate(model: HippoForCausalLM, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 128) -> float:
    """Fraction of queries answered correctly."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for i in range(0, len(inputs), batch_size):
        batch = slice(i, i + batch_size)
        logits, tgt = _query_logits(model, inputs[batch].to(device), targets[batch].to(device))
        correct += int((logits.argmax(-1) == tgt).sum())
        total += tgt.numel()
    return correct / max(total, 1)


def train_mqar(settings: MQARSettings, progress: bool = True) -> dict:
    """Train a fresh :class:`HippoForCausalLM` on MQAR; return accuracy per number of pairs and more."""
    settings.check()
    device = pick_device(settings.device)
    torch.manual_seed(settings.seed)
    model = HippoForCausalLM(settings.model_config()).to(device)
    s = settings
    per_pair = max(1, s.train_examples // len(s.pairs))
    train = [mqar_data(per_pair, s.seq_len, n, vocab_size=s.vocab_size, seed=_seed("train", s.seed, s.seq_len, n))
             for n in s.pairs]
    inputs, targets = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    evals = {n: mqar_data(s.eval_examples, s.seq_len, n, vocab_size=s.vocab_size,
                          seed=_seed("eval", s.seed, s.seq_len, n)) for n in s.pairs}

    opt = torch.optim.AdamW(_param_groups(model, s.weight_decay), lr=s.lr, betas=(0.9, 0.98))

    def lr_factor(progress: float) -> float:  # linear warmup, cosine decay to 0 at progress 1
        if progress < s.warmup_frac:
            return min(1.0, (progress + 1 / s.steps) / s.warmup_frac)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - s.warmup_frac) / max(1e-9, 1 - s.warmup_frac))))

    gen = torch.Generator().manual_seed(_seed("order", s.seed))
    order, cursor = torch.randperm(len(inputs), generator=gen), 0
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(s.steps), desc=f"mqar {s.mixer} d={s.d_model}", disable=not progress, leave=False)
    model.train()
    steps_done = 0
    for step in bar:
        elapsed = time.perf_counter() - start
        if s.time_limit is not None and elapsed > s.time_limit:
            break
        # Progress is the larger of steps and time used, so a time-limited run still warms up and
        # anneals to zero by its deadline instead of stopping at full learning rate.
        progress = step / s.steps
        if s.time_limit is not None:
            progress = max(progress, elapsed / s.time_limit)
        for group in opt.param_groups:
            group["lr"] = s.lr * lr_factor(progress)
        if cursor + s.batch_size > len(order):
            order, cursor = torch.randperm(len(inputs), generator=gen), 0
        idx = order[cursor : cursor + s.batch_size]
        cursor += s.batch_size
        logits, tgt = _query_logits(model, inputs[idx].to(device), targets[idx].to(device))
        loss = F.cross_entropy(logits.float(), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        steps_done += 1
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    train_seconds = time.perf_counter() - start
    accuracy = {n: evaluate(model, x, y, batch_size=max(s.batch_size, 64)) for n, (x, y) in evals.items()}
    tail = losses[-max(1, len(losses) // 20):]
    return {
        "settings": {**asdict(s), "pairs": list(s.pairs)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "accuracy": {str(n): a for n, a in accuracy.items()},
        "mean_accuracy": sum(accuracy.values()) / len(accuracy),
        "steps_done": steps_done,
        "loss_first": losses[0] if losses else None,
        "loss_last": sum(tail) / len(tail) if tail else None,
        "train_seconds": round(train_seconds, 2),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(result: dict | list, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
