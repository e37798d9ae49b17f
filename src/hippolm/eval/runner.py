"""Running a model as full attention, SWA-only or AHN; batched greedy generation; resumable results.

One AHN model serves all three systems: ``full`` is a cache that never evicts (window >= the
sequence), ``swa`` the configured sinks + window with the memory's read-out zeroed for the run
(exactly sliding-window attention, the memory's output projection is the only path to the
output), ``ahn`` the configured window with the memory as loaded. Any other causal LM runs as
itself (system ``model``).

Result files are JSONL, one sample per line, appended and flushed as samples finish; a run that
finds a file skips the ids already in it, so an interrupted evaluation continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..ahn import AHNForCausalLM

SYSTEMS = ("full", "swa", "ahn")
FULL = 1 << 40  # a window no sequence reaches: full attention


@dataclass(frozen=True)
class System:
    """How to run the model: ``window``/``sinks`` (None: the model's own), memory on or off."""

    name: str
    window: int | None = None
    sinks: int | None = None
    memory: bool = True


def make_systems(names: Sequence[str], model, window: int | None = None, sinks: int | None = None) -> list[System]:
    """Systems by name for ``model`` (``full``, ``swa``, ``ahn`` for AHN models; ``model`` otherwise)."""
    if not isinstance(model, AHNForCausalLM):
        return [System("model")]
    out = []
    for name in names:
        if name == "full":
            out.append(System("full", FULL, 0, memory=False))
        elif name == "swa":
            out.append(System("swa", window, sinks, memory=False))
        elif name == "ahn":
            out.append(System("ahn", window, sinks, memory=True))
        else:
            raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}.")
    return out


@contextlib.contextmanager
def memory_disabled(model) -> Iterator[None]:
    """Zero the memory read-out of an AHN model for the duration (exactly SWA), then restore it."""
    if not isinstance(model, AHNForCausalLM):
        yield
        return
    saved = {n: p.detach().clone() for n, p in model.memory_state_dict().items() if n.endswith("ahn.o_proj")}
    params = dict(model.memory_state_dict())
    try:
        with torch.no_grad():
            for n in saved:
                params[n].zero_()
        yield
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


def system_context(model, system: System):
    return contextlib.nullcontext() if system.memory else memory_disabled(model)


def memory_is_trained(model) -> bool:
    """Whether an AHN model's memory read-out is non-zero (a fresh memory equals SWA)."""
    if not isinstance(model, AHNForCausalLM):
        return False
    return any(bool(p.detach().abs().sum() > 0) for n, p in model.memory_state_dict().items()
               if n.endswith("ahn.o_proj"))


# ----------------------------------------------------------------------------------------------
# Result files


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: that sample runs again
            continue
    return rows


def done_ids(path: str | Path | None) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(path)} if path else {}


def append_jsonl(path: str | Path, row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A crash can leave a last line without its newline: start a new line rather than extend it.
    broken = False
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as f:
            f.seek(-1, 2)
            broken = f.read(1) != b"\n"
    with path.open("a", encoding="utf-8") as f:
        f.write(("\n" if broken else "") + json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()


# ----------------------------------------------------------------------------------------------
# Generation


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer, model) -> int:
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, getattr(model.config, "pad_token_id", None),
              getattr(model.config, "eos_token_id", None)):
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int,
                   window: int | None = None, sinks: int | None = None, add_special_tokens: bool = True,
                   eos_token_id: int | list[int] | None = None) -> list[str]:
    """Greedy continuations of a batch of prompts (text, or token ids), left-padded.

    For an AHN model, ``window``/``sinks`` set the cache (``window`` >= prompt + new tokens: full
    attention); other models ignore neither: they must be None.
    """
    if prompts and isinstance(prompts[0], str):
        encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    else:
        encoded = [list(p) for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("an empty prompt cannot be continued.")
    pad = _pad_id(tokenizer, model)
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    device = _device(model)
    ids, mask = ids.to(device), mask.to(device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    # The model's generation config knows its stop tokens (chat models often have several); the
    # tokenizer's EOS only fills in where it has none.
    gen_config = getattr(getattr(model, "base", model), "generation_config", None)
    eos = eos_token_id
    if eos is None and getattr(gen_config, "eos_token_id", None) is None:
        eos = tokenizer.eos_token_id
    if eos is not None:
        kwargs["eos_token_id"] = eos
    if isinstance(model, AHNForCausalLM):
        cfg = model.ahn_config
        win = cfg.window if window is None else window
        snk = cfg.sinks if sinks is None else sinks
        total = width + max_new_tokens
        if win + snk >= total:  # never evicts: size the buffer to the sequence
            win, snk = total, 0
        out = model.generate(ids, mask, past_key_values=model.new_cache(window=win, sinks=snk), **kwargs)
    else:
        if window is not None or sinks is not None:
            raise ValueError(f"window/sinks apply to AHNForCausalLM models only, not {type(model).__name__}.")
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]


def run_generation(model, tokenizer, samples: list[dict], score: Callable[[dict, str], dict], *,
                   batch_size: int = 1, max_new_tokens: int | None = None, window: int | None = None,
                   sinks: int | None = None, out_jsonl: str | Path | None = None, progress: bool = True,
                   desc: str = "generate", extra: dict | None = None) -> list[dict]:
    """Generate for samples (``prompt``, ``id``, optional ``max_new_tokens``/``add_special_tokens``),
    score each with ``score(sample, output) -> dict``, append results to ``out_jsonl``; samples
    whose id is already there are skipped and their stored result returned.

    ``max_new_tokens``: an int caps every sample's own limit (default 32) at it; None uses each sample's own.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    done = done_ids(out_jsonl)
    todo = [s for s in samples if s["id"] not in done]
    # Similar lengths per batch: less padding (results come back in the samples' order).
    todo.sort(key=lambda s: len(s["prompt"]))
    results = {sid: r for sid, r in done.items()}
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(todo), desc=desc, disable=not progress, leave=False)
    try:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            groups: dict[tuple[int, bool], list[dict]] = {}
            for s in batch:  # one generate call per (new tokens, special tokens) setting
                n = s.get("max_new_tokens", 32)
                n = n if max_new_tokens is None else min(n, max_new_tokens)
                groups.setdefault((int(n), bool(s.get("add_special_tokens", True))), []).append(s)
            for (n, special), group in groups.items():
                outputs = generate_batch(model, tokenizer, [s.get("input_ids") or s["prompt"] for s in group],
                                         max_new_tokens=n, window=window, sinks=sinks, add_special_tokens=special)
                for s, output in zip(group, outputs, strict=True):
                    row = {k: v for k, v in s.items() if k not in ("prompt", "input_ids")}
                    row.update(extra or {})
                    row["output"] = output
                    row.update(score(s, output))
                    results[s["id"]] = row
                    if out_jsonl:
                        append_jsonl(out_jsonl, row)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return [results[s["id"]] for s in samples if s["id"] in results]
