"""``hippolm eval``: long-context evaluation of full attention vs SWA-only vs AHN, side by side.

Tasks: ``ppl`` (perplexity by position bucket), the needle tests of :mod:`hippolm.eval.needle`,
``mqar`` (a saved standalone :class:`~hippolm.models.HippoForCausalLM`), and benchmark files
``longbench:<file>``, ``lveval:<file>``, ``infinitebench:<file>`` (``#subtask`` appended where
the file name does not say it). Results go to ``--out``: one JSONL per task and system (a re-run
skips what is done), ``summary.md``/``summary.csv`` and a heat map per needle task and system.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path

from ..runtime import HelpFormatter
from .needle import ALIASES, TASKS

NEEDLE_TASKS = (*TASKS, *ALIASES)


class EvalError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hippolm eval", formatter_class=HelpFormatter,
        description="Evaluate a base model as full attention, SWA-only and AHN (perplexity by position, needle "
                    "tests, MQAR, LongBench / LV-Eval / InfiniteBench files) with resumable results.")
    p.add_argument("--base", required=True, help="hub id or local path of the base model (or a saved hippolm "
                   "standalone model for --task mqar / ppl)")
    p.add_argument("--memory", default="gdn", help="saved memory folder (hippolm distill's memory/) or a memory "
                   "type for a fresh, untrained memory (then ahn equals swa)")
    p.add_argument("--tokenizer", default=None, help="tokenizer id or path (default: --base)")
    p.add_argument("--systems", default="full,swa,ahn", help="comma-separated: full, swa, ahn")
    p.add_argument("--task", action="append", required=True,
                   help="ppl, a needle task (" + ", ".join(NEEDLE_TASKS) + "), mqar, or longbench:<file>, "
                        "lveval:<file>, infinitebench:<file> (#subtask to name it); repeat or comma-separate")
    p.add_argument("--window", type=int, default=None, help="sliding window of swa/ahn (default: the memory's)")
    p.add_argument("--sinks", type=int, default=None, help="attention sinks of swa/ahn (default: the memory's)")
    p.add_argument("--lengths", type=_ints, default=[4096], help="needle prompt lengths in tokens; mqar sequence "
                   "lengths")
    p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=1, help="needle samples per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--buckets", type=_ints, default=[0, 2048, 8192, 32768], help="perplexity position edges")
    p.add_argument("--data", nargs="+", default=None, help="documents for ppl: .txt files (one document each), "
                   ".jsonl/.json rows with 'text' (or 'context'), globs "
                   "(default: the built-in corpus's held-out Paul Graham essays)")
    p.add_argument("--max-docs", type=int, default=8, help="documents for ppl")
    p.add_argument("--chunk-size", type=int, default=2048, help="tokens per forward in ppl")
    p.add_argument("--max-length", type=int, default=128000, help="benchmark prompts longer than this are cut in "
                   "the middle (LongBench's rule)")
    p.add_argument("--limit", type=int, default=None, help="first N rows of each benchmark file")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens (default: each task's)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--pairs", type=_ints, default=[4, 8, 16, 32, 64], help="mqar key-value pairs")
    p.add_argument("--mqar-examples", type=int, default=500, help="mqar sequences per (length, pairs)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", required=True, help="results folder (re-running continues it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines (the table still prints)")
    return p


# ----------------------------------------------------------------------------------------------
# Input checks (before any model is loaded)


def _split_tasks(values: list[str]) -> list[str]:
    tasks = []
    for v in values:
        # benchmark specs hold paths (which may contain commas only in odd cases): split on commas otherwise
        tasks += [v] if ":" in v else [t.strip() for t in v.split(",") if t.strip()]
    return tasks


def check_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    from .longbench import parse_task

    tasks = _split_tasks(args.task)
    for t in tasks:
        if ":" in t:
            _, path, _ = parse_task(t)
            if not path.is_file():
                raise EvalError(f"{t}: file {path} not found. Download the benchmark's JSONL (its data lives on the "
                                f"hub; hippolm does not fetch it) and pass its path.")
        elif t not in ("ppl", "mqar", *NEEDLE_TASKS):
            raise EvalError(f"unknown task {t!r}: use ppl, mqar, one of {', '.join(NEEDLE_TASKS)}, or "
                            f"longbench:<file>, lveval:<file>, infinitebench:<file>.")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        if s not in ("full", "swa", "ahn"):
            raise EvalError(f"unknown system {s!r} in --systems: use full, swa, ahn.")
    if not systems:
        raise EvalError("--systems is empty: use e.g. full,swa,ahn.")
    if any(not 0 <= d <= 1 for d in args.depths):
        raise EvalError("--depths are fractions of the haystack in [0, 1], e.g. 0,0.5,1.")
    for name in ("samples", "batch_size", "max_docs", "chunk_size", "mqar_examples", "max_length"):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1.")
    if (args.window is not None and args.window < 1) or (args.sinks is not None and args.sinks < 0):
        raise EvalError("--window must be >= 1 and --sinks >= 0.")
    for name in ("limit", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1 (or left out), got {getattr(args, name)}.")
    from ..runtime import pick_device

    try:
        pick_device(args.device)
    except ValueError as e:
        raise EvalError(str(e)) from None
    if args.data:
        missing = [d for d in args.data if not glob.glob(d)]
        if missing:
            raise EvalError(f"--data: nothing matches {', '.join(missing)}.")
    return tasks, systems


# ----------------------------------------------------------------------------------------------
# Loading


def _model_type(base: str) -> str | None:
    path = Path(base) / "config.json"
    if path.is_file():
        return json.loads(path.read_text()).get("model_type")
    return None


def load_model(args: argparse.Namespace):
    """(model, standalone?) for --base: a saved hippolm standalone model, or a base converted to AHN."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..ahn import AHNForCausalLM
    from ..runtime import pick_device, pick_dtype

    device = pick_device(args.device)  # checked by check_args
    dtype = pick_dtype(args.dtype, device)
    if device.type == "cpu" and dtype == torch.bfloat16:
        print("note: bfloat16 on CPU is slow and lossy; float32 is the CPU default.", file=sys.stderr)
    if _model_type(args.base) == "hippolm":
        from .. import models  # noqa: F401  (registers the standalone model with the Auto classes)

        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype).to(device).eval()
        return model, True
    try:
        model = AHNForCausalLM.from_base(args.base, memory=args.memory, window=args.window, sinks=args.sinks,
                                         dtype=dtype, device=device)
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot load --base {args.base} with --memory {args.memory}: {e}") from None
    return model.eval(), False


def load_tokenizer(args: argparse.Namespace):
    from transformers import AutoTokenizer

    from ..builtin import resolve_base

    name = args.tokenizer or args.base
    try:
        path = resolve_base(name)
    except ValueError as e:
        raise EvalError(f"--{'tokenizer' if args.tokenizer else 'base'} {e}") from None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot load a tokenizer from {name} ({e}); pass --tokenizer <id or path>.") from None


# ----------------------------------------------------------------------------------------------
# Tasks


def _documents(args: argparse.Namespace, tokenizer, limit_tokens: int) -> list[tuple[str, list[int]]]:
    """(id, token ids) of the ppl documents, each cut to ``limit_tokens``."""
    texts: list[tuple[str, str]] = []
    if args.data:
        for pattern in args.data:
            for f in sorted(glob.glob(pattern)):
                path = Path(f)
                if path.is_dir():
                    continue
                if path.suffix in (".jsonl", ".json"):
                    from .longbench import _read_rows

                    for i, row in enumerate(_read_rows(path)):
                        text = row.get("text") or row.get("context")
                        if not isinstance(text, str):
                            raise EvalError(f"{path}: row {i + 1} has no 'text' (or 'context') string.")
                        texts.append((f"{path.name}:{i}", text))
                else:
                    texts.append((path.name, path.read_text(encoding="utf-8", errors="replace")))
                if len(texts) >= args.max_docs:
                    break
    else:
        texts = _default_documents(args.max_docs, limit_tokens)
    docs = []
    for doc_id, text in texts[:args.max_docs]:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:limit_tokens]
        if len(ids) >= 2:
            docs.append((doc_id, ids))
    if not docs:
        raise EvalError("no ppl document has 2 tokens or more.")
    return docs


def _default_documents(count: int, limit_tokens: int) -> list[tuple[str, str]]:
    """Long documents from text no distillation default trains on: the held-out Paul Graham essays
    of the built-in corpus, joined end to end and cut into ``count`` documents of about
    ``limit_tokens`` tokens (5 characters a token is ample for English)."""
    try:
        from ..builtin import builtin_corpus

        text, source = "\n\n".join(builtin_corpus("heldout", sources=["essays"])), "heldout-essays"
    except Exception:  # the package is missing: RULER's essays or the synthetic haystack
        from .needle import essay_sentences

        sentences, source = essay_sentences()
        text = " ".join(sentences)
    step = 5 * limit_tokens
    return [(f"{source}:{k}", text[k * step:(k + 1) * step]) for k in range(count) if text[k * step:(k + 1) * step]]


def prepare_ppl(args, tokenizer) -> list[tuple[str, list[int]]]:
    from .perplexity import bucket_edges

    try:
        ranges = bucket_edges(args.buckets)
    except ValueError as e:
        raise EvalError(f"--buckets: {e}") from None
    return _documents(args, tokenizer, ranges[-1][1])


def run_ppl(args, docs: list[tuple[str, list[int]]], model, systems, out: Path) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    from .perplexity import bucket_edges, perplexity_by_position
    from .runner import append_jsonl, done_ids, system_context

    ranges = bucket_edges(args.buckets)
    _say(args, f"ppl on {len(docs)} documents ({sum(len(i) for _, i in docs):,} tokens)")
    rows = []
    for system in systems:
        path = out / "ppl" / f"{system.name}.jsonl"
        done = done_ids(path)
        for doc_id, ids in tqdm(docs, desc=f"ppl {system.name}", disable=args.quiet, leave=False):
            key = f"{doc_id}/{len(ids)}"
            if key in done:
                continue
            with system_context(model, system):
                r = perplexity_by_position(model, torch.tensor(ids), args.buckets, window=_win(model, system),
                                           sinks=_snk(model, system), progress=False, chunk_size=args.chunk_size)
            row = {"id": key, "system": system.name, "tokens": r["tokens"], "buckets": r["buckets"],
                   "nll_sum": [n * c if c else 0.0 for n, c in zip(r["nll"], r["tokens"], strict=True)]}
            append_jsonl(path, row)
            done[key] = row
        per_doc = [done[f"{d}/{len(i)}"] for d, i in docs]
        for b, (lo, hi) in enumerate(ranges):
            count = sum(r["tokens"][b] for r in per_doc)
            nll = sum(r["nll_sum"][b] for r in per_doc) / count if count else float("nan")
            rows.append({"task": "ppl", "group": f"{lo}-{hi}", "metric": "ppl", "system": system.name,
                         "value": math.exp(nll) if count else float("nan"), "n": count})
        _say(args, f"ppl {system.name}: " + ", ".join(f"{r['group']} {r['value']:.3f}" for r in rows[-len(ranges):]))
    return rows


def _win(model, system):
    from ..ahn import AHNForCausalLM

    return system.window if isinstance(model, AHNForCausalLM) else None


def _snk(model, system):
    from ..ahn import AHNForCausalLM

    return system.sinks if isinstance(model, AHNForCausalLM) else None


def prepare_needle(args, task: str, tokenizer) -> tuple[str, list[dict]]:
    from .needle import make_needle_samples, resolve_task

    name = resolve_task(task)
    try:
        return name, make_needle_samples(name, tokenizer, args.lengths, args.depths, args.samples, args.seed,
                                         chat=args.chat)
    except ValueError as e:
        raise EvalError(f"{name}: {e}") from None


def run_needle_task(args, name: str, samples: list[dict], model, tokenizer, systems, out: Path) -> list[dict]:
    from .needle import run_needle
    from .report import heatmap, mean_by
    from .runner import system_context

    rows = []
    for system in systems:
        path = out / name / f"{system.name}.jsonl"
        with system_context(model, system):
            results = run_needle(model, tokenizer, samples, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens,
                                 window=_win(model, system), sinks=_snk(model, system), out_jsonl=path,
                                 progress=not args.quiet, desc=f"{name} {system.name}")
        for (length,), (score, n) in sorted(mean_by(results, "length").items()):
            rows.append({"task": name, "group": length, "metric": "score", "system": system.name, "value": score,
                         "n": n})
        png = heatmap(results, out / name / f"heatmap_{system.name}.png", title=f"{name} ({system.name})")
        mean = sum(r["score"] for r in results) / len(results)
        _say(args, f"{name} {system.name}: {100 * mean:.1f} over {len(results)} samples; heat map {png}")
    return rows


def prepare_benchmark(args, spec: str, tokenizer) -> list[dict]:
    from .longbench import load_benchmark, parse_task, prepare_prompts

    bench, path, subtask = parse_task(spec)
    try:
        samples = prepare_prompts(load_benchmark(bench, path, subtask, args.limit), tokenizer, args.max_length,
                                  chat=args.chat)
    except ValueError as e:
        raise EvalError(str(e)) from None
    if not samples:
        raise EvalError(f"{path} holds no samples.")
    return samples


def run_benchmark(args, samples: list[dict], model, tokenizer, systems, out: Path) -> list[dict]:
    from .longbench import score_benchmark
    from .report import mean_by
    from .runner import run_generation, system_context

    bench, group = samples[0]["benchmark"], samples[0]["group"]
    rows = []
    for system in systems:
        result_path = out / bench / group / f"{system.name}.jsonl"
        with system_context(model, system):
            results = run_generation(
                model, tokenizer, samples, lambda s, o: {"score": score_benchmark(s, o)},
                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, window=_win(model, system),
                sinks=_snk(model, system), out_jsonl=result_path, progress=not args.quiet, desc=f"{bench} {group}")
        for (dataset,), (score, n) in mean_by(results, "dataset").items():
            rows.append({"task": bench, "group": group if group == dataset else f"{group} ({dataset})",
                         "metric": "score", "system": system.name, "value": score, "n": n})
        _say(args, f"{bench} {group} {system.name}: {100 * rows[-1]['value']:.2f} over {rows[-1]['n']} samples")
    return rows


def run_mqar(args, model, standalone: bool, out: Path) -> list[dict]:
    from ..tasks.mqar import _seed, evaluate, mqar_data
    from .runner import append_jsonl, done_ids

    cfg = model.config
    path = out / "mqar" / "model.jsonl"
    done = done_ids(path)
    rows = []
    lengths = args.lengths if args.lengths != [4096] else [cfg.max_position]
    for seq_len in lengths:
        for pairs in args.pairs:
            key = f"L{seq_len}/p{pairs}"
            if key not in done:
                if seq_len < 4 * pairs:
                    _say(args, f"mqar: skipping {pairs} pairs at length {seq_len} (needs length >= {4 * pairs})")
                    continue
                x, y = mqar_data(args.mqar_examples, seq_len, pairs, vocab_size=cfg.vocab_size,
                                 seed=_seed("eval", args.seed, seq_len, pairs))
                done[key] = {"id": key, "seq_len": seq_len, "pairs": pairs, "accuracy": evaluate(model, x, y),
                             "examples": args.mqar_examples}
                append_jsonl(path, done[key])
            r = done[key]
            rows.append({"task": "mqar", "group": f"L{seq_len} pairs={pairs}", "metric": "accuracy",
                         "system": "model", "value": r["accuracy"], "n": r["examples"]})
            _say(args, f"mqar L={seq_len} pairs={pairs}: accuracy {r['accuracy']:.4f}")
    return rows


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


# What a stored result depends on beyond its sample id: a run continued in the same --out must keep
# these (tasks, systems, lengths, limits and the like may change: they only add or pick samples)
RESULT_SETTINGS = ("base", "memory", "tokenizer", "window", "sinks", "seed", "chat", "buckets", "max_length",
                   "max_new_tokens", "dtype", "pairs", "mqar_examples")


def _check_same_settings(out: Path, args: argparse.Namespace) -> None:
    """Results in ``out`` are reused by sample id; refuse to mix them with results of other settings."""
    path = out / "args.json"
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    now = json.loads(json.dumps(vars(args), default=str))
    changed = [f"--{k.replace('_', '-')} {before[k]} -> {now.get(k)}" for k in RESULT_SETTINGS
               if k in before and before[k] != now.get(k)]
    if changed:
        raise EvalError(f"{out} holds results made with other settings ({'; '.join(changed)}): re-run with the same "
                        "options to continue it, or choose another --out.")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except EvalError as e:
        print(f"hippolm eval: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from .report import write_summary
    from .runner import make_systems, memory_is_trained

    try:
        tasks, system_names = check_args(args)
    except ValueError as e:
        raise EvalError(str(e)) from None
    standalone = _model_type(args.base) == "hippolm"
    if standalone and any(t not in ("mqar", "ppl") for t in tasks):
        raise EvalError(f"{args.base} is a standalone hippolm model: it runs --task mqar and ppl only.")
    if "mqar" in tasks and not standalone:
        raise EvalError("--task mqar evaluates a saved standalone model (HippoForCausalLM.save_pretrained(dir), "
                        "then --base dir); to train and evaluate one in one step run `hippolm mqar`.")
    # Everything that can fail on the user's input is prepared before the model loads.
    tokenizer = load_tokenizer(args) if any(t != "mqar" for t in tasks) else None
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    prepared: list[tuple[str, str, object]] = []
    for task in tasks:
        if task == "ppl":
            prepared.append(("ppl", task, prepare_ppl(args, tokenizer)))
        elif task == "mqar":
            prepared.append(("mqar", task, None))
        elif ":" in task:
            prepared.append(("benchmark", task, prepare_benchmark(args, task, tokenizer)))
        else:
            prepared.append(("needle", *prepare_needle(args, task, tokenizer)))
    out = Path(args.out)
    _check_same_settings(out, args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")
    model, standalone = load_model(args)
    systems = make_systems(system_names, model, args.window, args.sinks)
    if not standalone and "ahn" in system_names and not memory_is_trained(model):
        print(f"warning: memory {args.memory!r} is untrained (zero read-out): ahn equals swa. Pass a trained "
              f"memory folder with --memory.", file=sys.stderr)
    rows: list[dict] = []
    for kind, name, data in prepared:
        if kind == "ppl":
            task_rows = run_ppl(args, data, model, systems, out)
        elif kind == "mqar":
            task_rows = run_mqar(args, model, standalone, out)
        elif kind == "benchmark":
            task_rows = run_benchmark(args, data, model, tokenizer, systems, out)
        else:
            task_rows = run_needle_task(args, name, data, model, tokenizer, systems, out)
        write_summary(out, task_rows)  # after every task, so an interrupted run still has its table
        rows += task_rows
    paths = write_summary(out, rows)
    print(("" if args.quiet else "\n") + paths["markdown"].read_text(), end="")  # --quiet: no bars, still the table
    print(f"\nwrote {paths['markdown']} and {paths['csv']}")
    return 0
