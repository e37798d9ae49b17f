"""``hippolm demo``: the whole method on the built-in model and corpus, start to finish.

1. the built-in base (SmolLM2-135M-Instruct, converted once into the user cache);
2. ``hippolm distill`` of a Gated DeltaNet memory on the built-in corpus's training split;
3. perplexity by position on held-out text: full attention vs SWA-only (sinks + window, the
   memory's read-out off) vs AHN (sinks + window + trained memory);
4. a passkey sweep (prompt length x needle depth) for the same three systems;
5. cache bytes and FLOPs per token (analytic, :mod:`hippolm.accounting`) and the cache the AHN
   model really holds;
6. a generation from a long prompt, the cache measured as the prompt is read;
7. ``report.md``, ``summary.json`` and PNG plots in the run folder, and a table on the terminal.

The schedule fits the machine: on a GPU a few minutes (bf16, 2k-token sequences), on a CPU about
ten to fifteen minutes on two cores (float32, short sequences); ``--tiny`` is a smoke test. Every
stage writes its result into the run folder when it finishes (distillation checkpoints as it
goes), so re-running the same command after an interruption (Ctrl-C) continues where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130


class DemoError(Exception):
    """A problem the user can fix: one message, exit code 2."""


@dataclass
class Settings:
    """Everything that decides the results; stored in ``demo.json`` so a re-run continues the same demo."""

    preset: str = "cpu"
    base: str = "builtin"
    memory: str = "gdn"
    # distillation
    seq_len: int = 256
    steps: int = 60
    batch_size: int = 1
    lr: float = 1e-3
    train_windows: list[int] = field(default_factory=lambda: [32])
    train_sinks: list[int] = field(default_factory=lambda: [16])
    corpus_sources: list[str] = field(default_factory=list)  # empty: all
    grad_checkpointing: bool = False
    # evaluation (one window for all systems)
    window: int = 32
    sinks: int = 16
    eval_len: int = 1024
    eval_docs: int = 3
    buckets: list[int] = field(default_factory=lambda: [0, 48, 128, 256, 512, 1024])
    needle_task: str = "passkey"
    needle_lengths: list[int] = field(default_factory=lambda: [256, 1024])
    needle_depths: list[float] = field(default_factory=lambda: [0.25, 0.75])
    needle_new_tokens: int = 12
    gen_len: int = 2048
    gen_new_tokens: int = 24
    gen_chunks: int = 16  # cache measured after each of these prefill chunks
    cost_contexts: list[int] = field(default_factory=lambda: [1024, 8192, 32768, 131072])
    seed: int = 0


PRESETS: dict[str, dict] = {
    # One H100: ~2M training tokens; sequences of 2k, windows sampled as in the paper (L/8 < W < L).
    "gpu": dict(seq_len=2048, steps=300, batch_size=4, lr=1e-3, train_windows=[256, 512, 1024],
                train_sinks=[0, 32, 64, 128], window=512, sinks=64, eval_len=8192,
                eval_docs=8, buckets=[0, 576, 1024, 2048, 4096, 8192], needle_task="passkey",
                needle_lengths=[1024, 2048, 4096, 8000], needle_depths=[0.1, 0.3, 0.5, 0.7, 0.9],
                needle_new_tokens=12, gen_len=8000, gen_new_tokens=64),
    # Two CPU cores: ~15k training tokens in 256-token sequences with a small window, so the memory
    # does most of the work past position 48; ten to fifteen minutes all told.
    "cpu": {},
    # Tests: seconds.
    "tiny": dict(seq_len=64, steps=2, lr=1e-3, train_windows=[16], train_sinks=[4], corpus_sources=["squad"],
                 window=16, sinks=4, eval_len=128, eval_docs=1, buckets=[0, 20, 64, 128], needle_lengths=[96],
                 needle_depths=[0.5], needle_new_tokens=8, gen_len=128, gen_new_tokens=4, gen_chunks=2,
                 cost_contexts=[128, 8192]),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hippolm demo", description="Distil a Gated DeltaNet memory into the built-in model on the built-in "
        "corpus, then compare full attention, SWA-only and AHN: perplexity by position, a passkey sweep, cache "
        "bytes and FLOPs per token, and a long generation. Re-run the same command to continue an interrupted demo.")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="schedule: gpu, cpu (default: by device) or tiny")
    p.add_argument("--tiny", action="store_true", help="same as --preset tiny: a smoke test in about a minute")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--base", help="base model instead of the built-in one (hub id or local folder)")
    p.add_argument("--steps", type=int, help="distillation steps (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="distillation sequence length (default: the preset's)")
    p.add_argument("--window", type=int, help="evaluation window (default: the preset's)")
    p.add_argument("--sinks", type=int, help="evaluation sinks (default: the preset's)")
    p.add_argument("--eval-len", type=int, help="tokens per held-out perplexity document")
    p.add_argument("--gen-len", type=int, help="prompt tokens of the long generation")
    p.add_argument("--no-needle", action="store_true", help="skip the passkey sweep")
    p.add_argument("--restart", action="store_true", help="delete the run folder's results and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def settings_from_args(args: argparse.Namespace, device: torch.device) -> Settings:
    preset = "tiny" if args.tiny else args.preset or ("gpu" if device.type == "cuda" else "cpu")
    s = Settings(preset=preset, **PRESETS[preset])
    for name in ("base", "steps", "seq_len", "window", "sinks", "eval_len", "gen_len"):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    # Training windows: a preset that trains at its evaluation window follows a changed one; sampled
    # windows keep only those that leave positions to train on at the sequence length.
    fixed = len(s.train_windows) == 1 and len(s.train_sinks) == 1
    if fixed and (args.window is not None or args.sinks is not None):
        s.train_windows, s.train_sinks = [s.window], [s.sinks]
    s.train_windows = [w for w in s.train_windows if w + min(s.train_sinks) < s.seq_len]
    if not s.train_windows:
        if s.window + s.sinks >= s.seq_len:
            raise DemoError(f"--seq-len {s.seq_len} must exceed window + sinks = {s.window + s.sinks}: the memory "
                            "trains on the positions past them.")
        s.train_windows, s.train_sinks = [s.window], [s.sinks]
    if args.eval_len is not None:
        edges = [b for b in s.buckets if b < s.eval_len]
        s.buckets = [*edges, s.eval_len]
    for name, value, low in (("--steps", s.steps, 1), ("--seq-len", s.seq_len, 8), ("--window", s.window, 1),
                             ("--sinks", s.sinks, 0), ("--eval-len", s.eval_len, 8), ("--gen-len", s.gen_len, 8)):
        if value < low:
            raise DemoError(f"{name} must be >= {low}, got {value}.")
    if s.window + s.sinks >= s.eval_len:
        raise DemoError(f"--eval-len {s.eval_len} must exceed window + sinks = {s.window + s.sinks}: past them "
                        "is where the three systems differ.")
    return s


# --- small helpers ----------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


SYSTEMS = ("full", "swa", "ahn")
LABELS = {"full": "full attention", "swa": "SWA-only", "ahn": "AHN (SWA + memory)"}


# --- the stages -------------------------------------------------------------------------------------
class Demo:
    def __init__(self, out: Path, s: Settings, device: torch.device, progress: bool = True):
        self.out, self.s, self.device, self.progress = out, s, device, progress
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.eval_dir = out / "eval"
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = _read_json(out / "timings.json") or {}
        self._model = self._tokenizer = None

    def _timed(self, name: str, fn):
        t0 = time.perf_counter()
        result = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        _write_json(self.out / "timings.json", self.timings)
        return result

    # 1. base ------------------------------------------------------------------------------------
    def base(self) -> str:
        from .builtin import BuiltinError, resolve_base

        try:
            return resolve_base(self.s.base)
        except BuiltinError as e:
            raise DemoError(str(e)) from e

    # 2. distillation ---------------------------------------------------------------------------
    def distill(self) -> Path:
        from .builtin import BuiltinError, builtin_corpus_files, cache_dir
        from .train import distill as D

        run_dir = self.out / "distill"
        if (run_dir / "memory" / "ahn_config.json").is_file():
            _say(f"distillation: done earlier ({run_dir / 'memory'})")
            return run_dir / "memory"
        s = self.s
        if (run_dir / "args.json").is_file():
            _say(f"distillation: continuing {run_dir}")
            argv = ["--out", str(run_dir), "--resume"]
        else:
            try:
                data = builtin_corpus_files(s.corpus_sources or None)["train"]
            except BuiltinError as e:
                raise DemoError(str(e)) from e
            argv = ["--base", s.base, "--memory", s.memory, "--data", str(data), "--out", str(run_dir),
                    "--seq-len", str(s.seq_len), "--steps", str(s.steps), "--batch-size", str(s.batch_size),
                    "--lr", str(s.lr), "--warmup", str(max(1, s.steps // 10)),
                    "--window-choices", ",".join(map(str, s.train_windows)),
                    "--sink-choices", ",".join(map(str, s.train_sinks)),
                    "--save-every", str(max(1, min(50, s.steps // 4))), "--seed", str(s.seed),
                    "--cache-dir", str(cache_dir() / "datasets"), "--device", str(self.device)]
            if not s.grad_checkpointing:
                argv.append("--no-grad-checkpointing")
            _say(f"distillation: {s.steps} steps of {s.batch_size} x {s.seq_len} tokens, windows {s.train_windows}, "
                 f"sinks {s.train_sinks}, lr {s.lr} -> {run_dir}")
        if not self.progress:
            argv.append("--quiet")
        try:
            result = self._timed("distill", lambda: D.run(argv))
        except D.DistillError as e:
            raise DemoError(f"distillation: {e}") from e
        code = result.exit_code
        del result
        if code == D.EXIT_INTERRUPTED:
            raise KeyboardInterrupt
        if code != 0 or not (run_dir / "memory").is_dir():
            raise DemoError(f"distillation stopped (exit code {code}); see {run_dir}.")
        return run_dir / "memory"

    # model and data for the evaluations ---------------------------------------------------------------
    def model(self, memory: Path):
        if self._model is None:
            from transformers import AutoTokenizer

            from .ahn import AHNForCausalLM

            base = self.base()
            self._tokenizer = AutoTokenizer.from_pretrained(base)
            self._model = AHNForCausalLM.from_base(base, memory, window=self.s.window, sinks=self.s.sinks,
                                                   dtype=self.dtype, device=self.device).eval()
        return self._tokenizer, self._model

    def heldout_docs(self, tokenizer) -> list[torch.Tensor]:
        """Held-out essays end to end (EOS between), cut into ``eval_docs`` blocks of ``eval_len`` tokens."""
        from .builtin import builtin_corpus

        need = self.s.eval_len * self.s.eval_docs
        ids: list[int] = []
        for text in builtin_corpus("heldout", ["essays"]):
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(ids) >= need:
                break
        if len(ids) < self.s.eval_len:
            raise DemoError(f"the held-out essays hold {len(ids)} tokens, fewer than --eval-len {self.s.eval_len}.")
        n = min(self.s.eval_docs, len(ids) // self.s.eval_len)
        return [torch.tensor(ids[i * self.s.eval_len:(i + 1) * self.s.eval_len]) for i in range(n)]

    def _system(self, model, name: str):
        """(window, sinks, context manager) that make ``model`` run as system ``name``."""
        from .eval.runner import memory_disabled

        if name == "full":
            return 1 << 40, 0, contextlib.nullcontext()
        if name == "swa":
            return self.s.window, self.s.sinks, memory_disabled(model)
        return self.s.window, self.s.sinks, contextlib.nullcontext()

    # 3. perplexity -------------------------------------------------------------------------------
    def perplexity(self, memory: Path) -> dict:
        from .eval.perplexity import perplexity_by_position

        results = {}
        for name in SYSTEMS:
            path = self.eval_dir / f"ppl_{name}.json"
            done = _read_json(path)
            if done is not None:
                results[name] = done
                continue
            tokenizer, model = self.model(memory)
            docs = self.heldout_docs(tokenizer)
            window, sinks, ctx = self._system(model, name)
            _say(f"perplexity by position: {LABELS[name]} ({len(docs)} held-out documents of {self.s.eval_len} tokens)")
            with ctx:
                r = self._timed(f"ppl_{name}", lambda m=model, d=docs, w=window, k=sinks: perplexity_by_position(
                    m, d, self.s.buckets, window=min(w, self.s.eval_len), sinks=k, progress=self.progress))
            _write_json(path, r)
            results[name] = r
        return results

    # 4. passkey ---------------------------------------------------------------------------------
    def needle(self, memory: Path) -> dict:
        from .eval.needle import make_needle_samples, needle_heatmap, run_needle

        tokenizer, model = self.model(memory)
        samples = make_needle_samples(self.s.needle_task, tokenizer, self.s.needle_lengths, self.s.needle_depths,
                                      samples_per_cell=1, seed=self.s.seed)
        results = {}
        for name in SYSTEMS:
            window, sinks, ctx = self._system(model, name)
            jsonl = self.eval_dir / f"needle_{name}.jsonl"
            with ctx:
                rows = self._timed(f"needle_{name}", lambda w=window, k=sinks, j=jsonl, n=name: run_needle(
                    model, tokenizer, samples, max_new_tokens=self.s.needle_new_tokens, window=w, sinks=k,
                    out_jsonl=j, progress=self.progress, desc=f"{self.s.needle_task} {n}"))
            rows = [r for r in rows if r.get("id") in {x["id"] for x in samples}]
            results[name] = rows
            png = self.out / f"needle_{name}.png"
            if not png.is_file() and rows:
                needle_heatmap(rows, png, title=f"{self.s.needle_task}: {LABELS[name]} "
                               f"(sinks {self.s.sinks} + window {self.s.window})")
        return results

    # 5. costs ------------------------------------------------------------------------------------
    def costs(self, memory: Path) -> dict:
        from .accounting import ahn_cache_bytes, decode_flops, full_cache_bytes, memory_parameters, shape_of

        _, model = self.model(memory)
        shape = shape_of(model.config)
        kv = torch.finfo(self.dtype).bits // 8
        w, k, mem = self.s.window, self.s.sinks, self.s.memory
        rows = []
        for n in self.s.cost_contexts:
            rows.append({
                "context": n,
                "full_cache_bytes": full_cache_bytes(shape, n, kv).total,
                "ahn_cache_bytes": ahn_cache_bytes(shape, n, w, k, mem, kv_bytes=kv).total,
                "swa_cache_bytes": full_cache_bytes(shape, min(n, w + k), kv).total,
                "full_flops_per_token": decode_flops(shape, n).total,
                "ahn_flops_per_token": decode_flops(shape, n, window=w, sinks=k, memory=mem).total,
                "swa_flops_per_token": decode_flops(shape, min(n, w + k - 1)).total,
            })
        return {"kv_bytes": kv, "memory_parameters": memory_parameters(shape, mem),
                "base_parameters": sum(p.numel() for n, p in model.base.named_parameters() if ".ahn." not in n),
                "rows": rows}

    # 6. long generation --------------------------------------------------------------------------
    @torch.no_grad()
    def long_generation(self, memory: Path) -> dict:
        path = self.eval_dir / "generation.json"
        done = _read_json(path)
        if done is not None:
            return done
        from tqdm.auto import tqdm

        from .accounting import full_cache_bytes, shape_of
        from .builtin import builtin_corpus

        tokenizer, model = self.model(memory)
        doc: list[int] = []
        for text in builtin_corpus("heldout", ["essays"]):
            doc += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
            if len(doc) >= self.s.gen_len:
                break
        question = "\n\nWhich topics do the essays above discuss? Answer in two sentences."
        head = tokenizer.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False,
                                             add_generation_prompt=True) if tokenizer.chat_template else None
        if head:
            pre, post = head.split("X", 1)
            pre_ids = tokenizer(pre, add_special_tokens=False)["input_ids"]
            post_ids = tokenizer(question + post, add_special_tokens=False)["input_ids"]
        else:
            pre_ids, post_ids = [], tokenizer(question, add_special_tokens=False)["input_ids"]
        body = doc[:max(1, self.s.gen_len - len(pre_ids) - len(post_ids))]
        ids = torch.tensor([pre_ids + body + post_ids], device=self.device)
        T = ids.shape[1]
        cache = model.new_cache(window=self.s.window, sinks=self.s.sinks)
        shape, kv = shape_of(model.config), torch.finfo(self.dtype).bits // 8
        chunk = max(1, -(-(T - 1) // self.s.gen_chunks))
        trace = []
        t0 = time.perf_counter()
        bar = tqdm(total=T - 1, desc="long prompt (AHN)", unit="tok", disable=not self.progress, leave=False)
        for start in range(0, T - 1, chunk):
            end = min(start + chunk, T - 1)
            model.prefill(ids[:, :end], cache=cache, chunk_size=chunk)
            trace.append({"context": end, "ahn_cache_bytes": cache.nbytes(),
                          "full_cache_bytes": full_cache_bytes(shape, end, kv).total})
            bar.update(end - start)
        bar.close()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=self.s.gen_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - t0
        new = out[0, T:]
        final = T + int(new.numel())
        trace.append({"context": final, "ahn_cache_bytes": cache.nbytes(),
                      "full_cache_bytes": full_cache_bytes(shape, final, kv).total})
        result = {"prompt_tokens": T, "new_tokens": int(new.numel()), "seconds": seconds,
                  "question": question.strip(), "output": tokenizer.decode(new, skip_special_tokens=True).strip(),
                  "trace": trace, "window": self.s.window, "sinks": self.s.sinks}
        self.timings["generation"] = seconds
        _write_json(path, result)
        return result


# --- report -----------------------------------------------------------------------------------------
def _plot_ppl(ppl: dict, path: Path, s: Settings) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in SYSTEMS:
        r = ppl.get(name)
        if not r:
            continue
        mids = [(lo + hi) / 2 for lo, hi in r["buckets"]]
        ax.plot(mids, r["ppl"], marker="o", label=LABELS[name])
    ax.axvline(s.window + s.sinks, color="grey", ls="--", lw=0.8)
    ax.text(s.window + s.sinks, ax.get_ylim()[1], " sinks + window", va="top", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position (bucket middle)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Held-out perplexity by position ({s.base}, sinks {s.sinks} + window {s.window})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_cache(gen: dict, costs: dict, path: Path) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ctx = [t["context"] for t in gen["trace"]]
    ax[0].plot(ctx, [t["full_cache_bytes"] / 1e6 for t in gen["trace"]], label="full attention KV (analytic)")
    ax[0].plot(ctx, [t["ahn_cache_bytes"] / 1e6 for t in gen["trace"]], marker=".", label="AHN cache (measured)")
    ax[0].set_xlabel("tokens read")
    ax[0].set_ylabel("cache (MB)")
    ax[0].set_title("Cache while reading the long prompt", fontsize=9)
    ax[0].legend()
    rows = costs["rows"]
    n = [r["context"] for r in rows]
    ax[1].plot(n, [r["full_flops_per_token"] / 1e9 for r in rows], marker="o", label="full attention")
    ax[1].plot(n, [r["ahn_flops_per_token"] / 1e9 for r in rows], marker="o", label="AHN")
    ax[1].set_xscale("log", base=2)
    ax[1].set_xlabel("context (tokens)")
    ax[1].set_ylabel("GFLOPs per decoded token (analytic)")
    ax[1].set_title("Compute per token", fontsize=9)
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _needle_mean(rows: list[dict]) -> float:
    return sum(r["score"] for r in rows) / len(rows) if rows else float("nan")


def summarize(s: Settings, ppl: dict, needle: dict, costs: dict, gen: dict, timings: dict) -> dict:
    last = costs["rows"][0]
    return {
        "settings": asdict(s),
        "perplexity": {k: {"buckets": v["buckets"], "ppl": v["ppl"], "tokens": v["tokens"],
                           "overall": v["overall"]["ppl"]} for k, v in ppl.items()},
        "needle": {k: {"mean_score": _needle_mean(v), "samples": len(v)} for k, v in needle.items()},
        "costs": costs,
        "cache_at_eval_len": {"context": last["context"], "full": last["full_cache_bytes"],
                              "ahn": last["ahn_cache_bytes"], "swa": last["swa_cache_bytes"]},
        "generation": {k: gen[k] for k in ("prompt_tokens", "new_tokens", "seconds", "output")}
        | {"cache_first": gen["trace"][0]["ahn_cache_bytes"], "cache_last": gen["trace"][-1]["ahn_cache_bytes"]},
        "timings_s": timings,
        "device": _device_name(),
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                     "hippolm": _version("hippolm"), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def results_table(summary: dict) -> str:
    """The terminal / markdown table: one row per system."""
    s = summary["settings"]
    ppl = summary["perplexity"]
    buckets = next(iter(ppl.values()))["buckets"] if ppl else []
    heads = [f"ppl {lo}-{hi}" for lo, hi in buckets]
    ctx = summary["cache_at_eval_len"]["context"]
    rows0 = summary["costs"]["rows"][0]
    cols = ["system", *heads, f"{s['needle_task']} %", f"cache @{_ctx(ctx)}", f"FLOPs/token @{_ctx(ctx)}"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name in SYSTEMS:
        p = ppl.get(name)
        cells = [LABELS[name]] + ([f"{x:.2f}" for x in p["ppl"]] if p else ["-"] * len(heads))
        nd = summary["needle"].get(name)
        cells.append(f"{100 * nd['mean_score']:.0f}" if nd and nd["samples"] else "-")
        cells.append(_human_bytes(rows0[f"{name}_cache_bytes"]))
        cells.append(_flops(rows0[f"{name}_flops_per_token"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, summary: dict, plots: dict[str, Path | None]) -> Path:
    s = summary["settings"]
    costs, gen = summary["costs"], summary["generation"]
    t = summary["timings_s"]
    lines = [
        "# hippolm demo",
        "",
        f"Base `{s['base']}` + `{s['memory']}` memory, distilled for {s['steps']} steps of {s['batch_size']} x "
        f"{s['seq_len']} tokens (windows {s['train_windows']}, sinks {s['train_sinks']}) on the built-in corpus; "
        f"evaluated with sinks {s['sinks']} + window {s['window']} on held-out essays. Device: {summary['device']}; "
        f"{summary['date']}.",
        "",
        "## Results",
        "",
        results_table(summary),
        "",
        f"Perplexity: {summary['perplexity'].get('full', {}).get('tokens', ['?'])} tokens per bucket; "
        f"full attention is the teacher, SWA-only the same model with the memory's read-out off, AHN the trained "
        f"memory. The passkey column is the mean score over prompt lengths {s['needle_lengths']} x depths "
        f"{s['needle_depths']} (exact recall: where a compressed memory is expected to lose to full attention).",
        "",
    ]
    if plots.get("ppl"):
        lines += [f"![perplexity by position]({plots['ppl'].name})", ""]
    for name in SYSTEMS:
        if plots.get(f"needle_{name}"):
            lines += [f"![{name} passkey]({plots[f'needle_{name}'].name})"]
    lines += ["", "## Cache and compute (analytic, per sequence)", "",
              f"Memory parameters: {costs['memory_parameters']:,} (base: {costs['base_parameters']:,}); "
              f"KV entries of {costs['kv_bytes']} bytes, memory state float32.", "",
              "| context | full KV | SWA-only | AHN cache | AHN / full | full FLOPs/token | AHN FLOPs/token |",
              "|---|---|---|---|---|---|---|"]
    for r in costs["rows"]:
        lines.append(f"| {r['context']:,} | {_human_bytes(r['full_cache_bytes'])} | "
                     f"{_human_bytes(r['swa_cache_bytes'])} | {_human_bytes(r['ahn_cache_bytes'])} | "
                     f"{r['ahn_cache_bytes'] / r['full_cache_bytes']:.3f} | "
                     f"{_flops(r['full_flops_per_token'])} | {_flops(r['ahn_flops_per_token'])} |")
    lines += ["", "## Long generation", "",
              f"Prompt of {gen['prompt_tokens']:,} tokens (held-out essays + a question), read in chunks; the AHN "
              f"cache held {_human_bytes(gen['cache_first'])} after the first chunk and "
              f"{_human_bytes(gen['cache_last'])} at the end, where full attention would hold "
              f"{_human_bytes(summary['costs_generation_full'])}. {gen['new_tokens']} tokens generated "
              f"({gen['seconds']:.1f} s including the prompt):", "", "> " + gen["output"].replace("\n", "\n> "), ""]
    if plots.get("cache"):
        lines += [f"![cache and FLOPs]({plots['cache'].name})", ""]
    if plots.get("loss"):
        lines += ["## Distillation", "", f"![loss]({plots['loss'].name})", ""]
    lines += ["## Time", "", " | ".join(f"{k} {v:.0f} s" for k, v in t.items()), "",
              "Files: `summary.json` (all numbers), `eval/` (per-system results), `distill/` (the run: "
              "`metrics.jsonl`, checkpoints, `memory/`).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# --- main -------------------------------------------------------------------------------------------
def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from .runtime import pick_device

    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise DemoError(str(e)) from None
    s = settings_from_args(args, device)
    out = Path(args.out)
    saved = _read_json(out / "demo.json")
    if args.restart and out.exists():
        if saved is None and any(out.iterdir()):  # only a demo's own folder is ever deleted
            raise DemoError(f"--out {out} exists and is not a demo run folder (no demo.json): --restart deletes "
                            "only a demo's folder; choose another --out.")
        import shutil

        shutil.rmtree(out)
        saved = None
    if saved is not None:
        known = {f.name for f in fields(Settings)}
        previous = Settings(**{k: v for k, v in saved.items() if k in known})
        if previous != s:
            diff = [k for k in known if getattr(previous, k) != getattr(s, k)]
            raise DemoError(f"{out} holds a demo with other settings ({', '.join(sorted(diff))}): re-run with the "
                            "same options to continue it, pass --restart to start over, or choose another --out.")
    elif out.exists() and any(out.iterdir()):
        raise DemoError(f"--out {out} exists and is not a demo run folder; choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "demo.json", asdict(s))
    t_start = time.perf_counter()
    _say(f"run folder {out}; preset {s.preset} on {device} ({'bf16' if device.type == 'cuda' else 'float32'}); "
         "interrupt with Ctrl-C and re-run the same command to continue")
    demo = Demo(out, s, device, progress=not args.quiet)
    _say("1/6 base model")
    path = demo._timed("base", demo.base)
    _say(f"base model: {path}")
    _say("2/6 distillation")
    memory = demo.distill()
    _say("3/6 perplexity by position (held-out essays)")
    ppl = demo.perplexity(memory)
    needle = {}
    if not args.no_needle:
        _say(f"4/6 {s.needle_task} sweep: lengths {s.needle_lengths} x depths {s.needle_depths}")
        needle = demo.needle(memory)
    _say("5/6 cache bytes and FLOPs per token")
    costs = demo.costs(memory)
    _say(f"6/6 generation from a {s.gen_len}-token prompt")
    gen = demo.long_generation(memory)

    plots: dict[str, Path | None] = {"ppl": _plot_ppl(ppl, out / "ppl_by_position.png", s),
                                     "cache": _plot_cache(gen, costs, out / "cache_flops.png")}
    for name in SYSTEMS:
        png = out / f"needle_{name}.png"
        plots[f"needle_{name}"] = png if png.is_file() else None
    loss = out / "distill" / "loss.png"
    plots["loss"] = loss if loss.is_file() else None
    summary = summarize(s, ppl, needle, costs, gen, demo.timings)
    from .accounting import full_cache_bytes, shape_of

    summary["costs_generation_full"] = full_cache_bytes(shape_of(demo._model.config), gen["trace"][-1]["context"],
                                                        costs["kv_bytes"]).total
    summary["wall_s_this_run"] = time.perf_counter() - t_start
    _write_json(out / "summary.json", summary)
    report = write_report(out, summary, plots)
    print()
    print(results_table(summary))
    print()
    g = summary["generation"]
    print(f"Long generation ({g['prompt_tokens']:,}-token prompt): AHN cache {_human_bytes(g['cache_first'])} after "
          f"the first chunk, {_human_bytes(g['cache_last'])} at the end; full attention would hold "
          f"{_human_bytes(summary['costs_generation_full'])}.")
    print(f"  > {g['output'][:300]}")
    print()
    print(f"Report: {report}")
    print(f"Plots:  {', '.join(str(p) for p in plots.values() if p)}")
    print(f"Data:   {out / 'summary.json'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
        return 0
    except DemoError as e:
        print(f"hippolm demo: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\nhippolm demo: interrupted; run the same command again to continue where it stopped.",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
