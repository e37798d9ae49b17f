"""MQAR comparison of the log-linear paper: Mamba-2 vs log-linear Mamba-2, Gated DeltaNet vs
log-linear Gated DeltaNet, softmax attention as the ceiling, at model dims 16 / 32 / 64.

    python benchmarks/mqar_sweep.py --small                 # 2-core CPU, under 10 minutes (dim 64)
    python benchmarks/mqar_sweep.py --gpu-budget 500        # one GPU: seq 256, 4..64 pairs, ~9 minutes
    python benchmarks/mqar_sweep.py --plot-only FILE        # redraw the plot of a result file

Runs go to worker processes (``--jobs``, one thread each by default: on a small CPU several
single-thread runs beat one multi-thread run, whose threads wait on each other; on a GPU the runs
share the device). For each (mixer, dim) the best learning rate is kept, as in Zoology, and the best
decay-rate init of ``--a-init-ranges`` (Mamba-2's A ~ U(1, 16) by default; with one head it can draw
a fast-forgetting A: Mamba-2 on the CPU setting reached 0.39 with U(1, 16) and 0.99 with A = 1).
``--gpu-budget``/``--budget`` SECONDS caps the whole sweep's wall time: every run gets the same
training-time limit (the budget less start-up, times the jobs, shared over the runs, less
evaluation), and its learning-rate schedule anneals by that deadline. Results: JSON (written
after every run) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hippolm.tasks.mqar import MQARSettings, train_mqar

MIXERS = ("attention", "mamba2", "loglinear_mamba2", "gdn", "loglinear_gdn")
LABELS = {"attention": "Transformer", "mamba2": "Mamba-2", "loglinear_mamba2": "Log-linear Mamba-2",
          "gdn": "Gated DeltaNet", "loglinear_gdn": "Log-linear Gated DeltaNet"}
STYLE = {"attention": ("black", ":"), "mamba2": ("tab:blue", "--"), "loglinear_mamba2": ("tab:blue", "-"),
         "gdn": ("tab:red", "--"), "loglinear_gdn": ("tab:red", "-")}

# The paper's task (seq 256, 4..64 pairs, vocab 8192) at the length of training one lent GPU affords
# in ~9 minutes for all 15 runs at once (2000 steps x batch 128, about 1.4 epochs of 180k examples;
# Zoology trains 32-64 epochs of batch 256).
FULL = dict(seq_len=256, pairs=(4, 8, 16, 32, 64), vocab_size=8192, train_examples=180_000, eval_examples=1000,
            steps=2000, batch_size=128, lrs=(3e-3,), dims="16,32,64")
# Short sequences, few pairs, a small vocabulary and model dim 64 only: what a shared 2-core CPU
# trains past MQAR's plateau in under 10 minutes (default --budget 560: ~200 s per run). Measured:
# at 60 s per run (all three dims) every model was still on the plateau where it only guesses
# among the values present in the context (accuracy <= 1/2 and 1/4), GDN d=64 at 0.09 after 339 steps.
SMALL = dict(seq_len=32, pairs=(2, 4), vocab_size=64, train_examples=20_000, eval_examples=300,
             steps=1000, batch_size=32, lrs=(3e-3,), dims="64")
OVERHEAD = {"start": 30.0, "per_run": 10.0}  # seconds: spawn + data; evaluation + saving per run


def _run(settings: MQARSettings, threads: int) -> dict:
    torch.set_num_threads(threads)
    return train_mqar(settings, progress=False)


def _best(runs: list[dict]) -> dict[str, dict[int, dict]]:
    """Best run (by mean accuracy) per mixer and model dim."""
    best: dict[str, dict[int, dict]] = {}
    for r in runs:
        s = r["settings"]
        cur = best.setdefault(s["mixer"], {}).get(s["d_model"])
        if cur is None or r["mean_accuracy"] > cur["mean_accuracy"]:
            best[s["mixer"]][s["d_model"]] = r
    return best


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _best(result["runs"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mixer in MIXERS:
        if mixer not in best:
            continue
        color, ls = STYLE[mixer]
        dims = sorted(best[mixer])
        left.plot(dims, [best[mixer][d]["mean_accuracy"] for d in dims], color=color, ls=ls, marker="o",
                  label=LABELS[mixer])
        top = best[mixer][dims[-1]]["accuracy"]
        pairs = sorted(top, key=int)
        right.plot([int(p) for p in pairs], [top[p] for p in pairs], color=color, ls=ls, marker="o",
                   label=f"{LABELS[mixer]} (d={dims[-1]})")
    s = result["setting"]
    left.set(xlabel="model dimension", ylabel="accuracy (mean over pairs)", xscale="log", ylim=(-0.02, 1.02),
             title=f"MQAR, seq {s['seq_len']}, pairs {','.join(map(str, s['pairs']))}")
    left.set_xticks(sorted({d for m in best.values() for d in m}), [str(d) for d in sorted({d for m in best.values()
                                                                                           for d in m})])
    right.set(xlabel="key-value pairs", ylabel="accuracy", xscale="log", ylim=(-0.02, 1.02),
              title="by number of pairs, largest dim")
    right.set_xticks([int(p) for p in s["pairs"]], [str(p) for p in s["pairs"]])
    for ax in (left, right):
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.suptitle(f"{result['name']}: {result['device']}, {s['steps']} steps x batch {s['batch_size']}, "
                 f"vocab {s['vocab_size']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the CPU setting (under 10 minutes on 2 cores)")
    p.add_argument("--mixers", default=",".join(MIXERS))
    p.add_argument("--dims", default=None, help="model dims (default 16,32,64; 64 with --small)")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (best one is kept)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--a-init-ranges", default="1,16",
                   help="decay-rate inits A ~ U(lo, hi) to try, 'lo,hi;lo,hi' (best kept, like the learning rate); "
                        "the extra ones run for --a-init-mixers only")
    p.add_argument("--a-init-mixers", default="mamba2,loglinear_mamba2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=None, help="seconds of training per run (stops early)")
    p.add_argument("--budget", "--gpu-budget", dest="budget", type=float, default=None,
                   help="wall seconds for the whole sweep (sets --time-limit; default 560 with --small)")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=None, help="parallel runs (default: CPU count, at most 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/mqar_sweep[_small].json)")
    p.add_argument("--plot-only", default=None, metavar="JSON", help="only redraw the plot of this result file")
    args = p.parse_args()

    if args.plot_only:
        path = Path(args.plot_only)
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return

    name = "mqar_sweep_small" if args.small else "mqar_sweep"
    out = Path(args.out or Path(__file__).parent / "results" / f"{name}.json")
    setting = dict(SMALL if args.small else FULL)
    if args.lrs:
        setting["lrs"] = tuple(float(x) for x in args.lrs.split(","))
    if args.steps:
        setting["steps"] = args.steps
    lrs = setting.pop("lrs")
    dims = (args.dims or setting.pop("dims")).split(",")
    setting.pop("dims", None)
    base = MQARSettings(num_layers=2, num_heads=1, seed=args.seed, device=args.device, **setting)
    # Largest dims first: they are the slowest, so they should not start in the last wave.
    try:
        a_ranges = [tuple(float(x) for x in r.split(",")) for r in args.a_init_ranges.split(";")]
    except ValueError:
        raise SystemExit(f"--a-init-ranges must look like '1,16;1,1', got {args.a_init_ranges!r}") from None
    a_mixers = set(args.a_init_mixers.split(","))

    def a_for(mixer: str) -> list[tuple[float, ...]]:
        return a_ranges if mixer in a_mixers else a_ranges[:1]

    grid = [replace(base, mixer=m, d_model=int(d), lr=lr, a_init_range=a)
            for d in sorted(dims, key=int, reverse=True) for m in args.mixers.split(",") for lr in lrs
            for a in a_for(m)]
    for s in grid:
        if s.mixer not in MIXERS:
            raise SystemExit(f"unknown mixer {s.mixer!r}; choose from {', '.join(MIXERS)}")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    jobs = args.jobs or min(len(grid), 16 if device.startswith("cuda") else min(8, os.cpu_count() or 1))
    budget = args.budget if args.budget is not None else (560.0 if args.small else None)
    time_limit = args.time_limit
    if budget is not None:
        # The jobs' seconds shared evenly (attention runs usually end early, which leaves slack).
        per_run = (budget - OVERHEAD["start"]) * min(jobs, len(grid)) / len(grid) - OVERHEAD["per_run"]
        if per_run < 5:
            raise SystemExit(f"--budget {budget:.0f} s is too short for {len(grid)} runs on {jobs} jobs.")
        time_limit = per_run if time_limit is None else min(time_limit, per_run)
    grid = [replace(s, time_limit=time_limit) for s in grid]
    result = {
        "name": name,
        "setting": {**setting, "pairs": list(setting["pairs"]), "lrs": list(lrs), "dims": [int(d) for d in dims],
                    "a_init_ranges": [list(a) for a in a_ranges], "a_init_mixers": sorted(a_mixers),
                    "num_layers": 2, "num_heads": 1,
                    "initializer_range": "hidden_size ** -0.5 (residual output projections: "
                                         "initializer_range / sqrt(fan_in))"},
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
        "jobs": jobs, "threads_per_job": args.threads, "budget_seconds": budget, "time_limit_per_run": time_limit,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "runs": [],
    }
    start = time.perf_counter()
    ctx = mp.get_context("spawn")  # CUDA and fork do not mix
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_run, s, args.threads) for s in grid]
        for fut in tqdm(cf.as_completed(futures), total=len(futures), desc="MQAR sweep"):
            r = fut.result()
            result["runs"].append(r)
            result["wall_seconds"] = round(time.perf_counter() - start, 1)
            s = r["settings"]
            tqdm.write(f"{s['mixer']:>17} d={s['d_model']:<3} lr={s['lr']:.0e} A~U{tuple(s['a_init_range'])}  "
                       f"mean acc {r['mean_accuracy']:.3f}  "
                       + " ".join(f"{k}:{v:.2f}" for k, v in r["accuracy"].items())
                       + f"  ({r['steps_done']} steps, {r['train_seconds']:.0f} s)")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    best = _best(result["runs"])
    result["best"] = {m: {str(d): {"mean_accuracy": r["mean_accuracy"], "accuracy": r["accuracy"],
                                   "lr": r["settings"]["lr"]} for d, r in sorted(best[m].items())}
                      for m in MIXERS if m in best}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['wall_seconds']:.0f} s")
    print("mean accuracy (best lr)   " + "  ".join(f"d={d:>3}" for d in sorted(dims, key=int)))
    for m, by_dim in result["best"].items():
        print(f"{LABELS[m]:>26}  " + "  ".join(f"{v['mean_accuracy']:.3f}" for v in by_dim.values()))


if __name__ == "__main__":
    main()
