"""Proof that distillation teaches the memory: full attention vs SWA-only vs AHN on held-out text.

Distils a GDN memory into the built-in base (SmolLM2-135M-Instruct) on the built-in corpus's
training split with ``hippolm distill`` (random windows and sinks, as the paper), then scores the
held-out split cut into documents of ``--seq-len`` tokens with a fixed ``--window``/``--sinks``:
per position bucket, the perplexity of each system and the KL(teacher || student) of SWA-only
and AHN to full attention (the teacher). SWA-only is the same model with the memory's read-out
zeroed, i.e. exactly sinks + sliding window.

    python -P benchmarks/distill_proof.py --out runs/proof --json benchmarks/results/distill_proof_h100.json
    python -P benchmarks/distill_proof.py --tiny ...   # a few steps on CPU, to check the script
    python -P benchmarks/distill_proof.py --memory runs/demo/distill/memory --window 32 --sinks 16 \
        --seq-len 1024 --buckets 0,48,128,256,512,1024   # score a trained memory (the demo's), no training
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from hippolm import AHNForCausalLM
from hippolm.builtin import builtin_base_path, builtin_corpus
from hippolm.eval.perplexity import bucket_edges
from hippolm.train import distill


def heldout_documents(tokenizer, seq_len: int, limit: int) -> list[torch.Tensor]:
    """The held-out split, tokenised, concatenated with EOS between texts, cut into seq_len blocks."""
    ids: list[int] = []
    for text in builtin_corpus("heldout"):
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [torch.tensor(ids[i : i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return blocks[:limit]


@torch.no_grad()
def score(model: AHNForCausalLM, docs: list[torch.Tensor], window: int, sinks: int, buckets) -> dict:
    """Per bucket: NLL of full attention, SWA-only and AHN, and KL(full || system) of the latter two."""
    ranges = bucket_edges(buckets)
    keys = ["nll_full", "nll_swa", "nll_ahn", "kl_swa", "kl_ahn"]
    sums = {k: [0.0] * len(ranges) for k in keys}
    counts = [0] * len(ranges)
    o_projs = [layer.self_attn.ahn.o_proj for layer in model.base.get_decoder().layers]
    trained = [p.detach().clone() for p in o_projs]
    dev = model.device
    for doc in docs:
        ids = doc.to(dev)[None]
        T = ids.shape[1]
        logp = {"full": F.log_softmax(model(ids, window=T, sinks=0).logits[0, :-1].float(), -1)}
        logp["ahn"] = F.log_softmax(model(ids, window=window, sinks=sinks).logits[0, :-1].float(), -1)
        for p in o_projs:
            p.zero_()  # zero read-out: exactly sinks + sliding window
        logp["swa"] = F.log_softmax(model(ids, window=window, sinks=sinks).logits[0, :-1].float(), -1)
        for p, w in zip(o_projs, trained, strict=True):
            p.copy_(w)
        target = ids[0, 1:, None]
        per_pos = {f"nll_{s}": -lp.gather(-1, target)[:, 0] for s, lp in logp.items()}
        p_full = logp["full"].exp()
        for s in ("swa", "ahn"):
            per_pos[f"kl_{s}"] = (p_full * (logp["full"] - logp[s])).sum(-1)
        for b, (lo, hi) in enumerate(ranges):  # per_pos[i] is about the token at position i + 1
            sl = slice(max(lo - 1, 0), max(min(hi, T) - 1, 0))
            counts[b] += per_pos["nll_full"][sl].numel()
            for k in keys:
                sums[k][b] += float(per_pos[k][sl].double().sum())
        del logp, p_full, per_pos
    out = {"buckets": [[lo, hi] for lo, hi in ranges], "tokens": counts}
    for k in keys:
        mean = [s / c if c else float("nan") for s, c in zip(sums[k], counts, strict=True)]
        out[k] = mean
        if k.startswith("nll"):
            out["ppl" + k[3:]] = [math.exp(m) if c else float("nan") for m, c in zip(mean, counts, strict=True)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/distill_proof", help="distillation run folder")
    parser.add_argument("--json", default=None)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--window", type=int, default=512, help="evaluation window")
    parser.add_argument("--sinks", type=int, default=32, help="evaluation sinks")
    parser.add_argument("--buckets", default="0,512,1024,2048,4096")
    parser.add_argument("--eval-docs", type=int, default=16)
    parser.add_argument("--train-seq-len", type=int, default=None, help="training sequence length (default --seq-len)")
    parser.add_argument("--train-windows", default="256,512,1024",
                        help="windows sampled in training (the evaluation window must be among what it saw)")
    parser.add_argument("--memory", default=None,
                        help="score this trained memory folder instead of training one (e.g. the demo's)")
    parser.add_argument("--tiny", action="store_true", help="CPU check: 3 steps, 256 tokens")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.seq_len, args.batch_size, args.window, args.sinks = 3, 256, 1, 64, 4
        args.train_seq_len = None
        args.buckets, args.eval_docs, args.train_windows = "0,64,128,256", 1, "64,128"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = str(builtin_base_path())
    train_s = 0.0
    if args.memory is None:
        train_len = args.train_seq_len or args.seq_len
        argv = ["--base", base, "--memory", "gdn", "--seq-len", str(train_len), "--steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--out", args.out,
                "--window-choices", args.train_windows, "--save-every", str(max(args.steps // 3, 1))]
        if Path(args.out, "args.json").exists():
            argv.append("--resume")
        start = time.time()
        result = distill.run(argv)
        train_s = time.time() - start
        if result.exit_code:
            raise SystemExit(f"distillation failed (exit {result.exit_code})")
    memory_dir = Path(args.memory) if args.memory else Path(args.out) / "memory"
    model = AHNForCausalLM.from_base(base, memory=str(memory_dir), window=args.window, sinks=args.sinks,
                                     dtype=torch.bfloat16 if dev == "cuda" else torch.float32, device=dev).eval()
    tok = transformers.AutoTokenizer.from_pretrained(base)
    docs = heldout_documents(tok, args.seq_len, args.eval_docs)
    scores = score(model, docs, args.window, args.sinks, [int(b) for b in args.buckets.split(",")])
    meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
            "base": "SmolLM2-135M-Instruct (built-in)", "memory": str(memory_dir),
            "train_steps": None if args.memory else args.steps,
            "seq_len": args.seq_len, "train_seq_len": None if args.memory else args.train_seq_len or args.seq_len,
            "batch_size": args.batch_size, "lr": args.lr, "train_seconds": train_s,
            "eval_window": args.window, "eval_sinks": args.sinks, "eval_documents": len(docs),
            "train_windows": None if args.memory else args.train_windows}
    print(json.dumps(meta))
    print(f"{'positions':>12} {'ppl full':>9} {'ppl swa':>9} {'ppl ahn':>9} {'KL swa':>8} {'KL ahn':>8}")
    for i, (lo, hi) in enumerate(scores["buckets"]):
        print(f"{lo:>5}-{hi:<6} {scores['ppl_full'][i]:9.3f} {scores['ppl_swa'][i]:9.3f} {scores['ppl_ahn'][i]:9.3f}"
              f" {scores['kl_swa'][i]:8.4f} {scores['kl_ahn'][i]:8.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "scores": scores}, indent=2))


if __name__ == "__main__":
    main()
