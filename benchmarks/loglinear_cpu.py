"""The log-linear ops' torch reference (chunk mode) on CPU, float32: forward and forward+backward
per shape, best of 3, JSON with the commit it ran. Compare two versions by running the script with
another package tree first on the path, e.g. an older commit's:

    git archive REV src | tar -x -C /tmp/old && PYTHONPATH=/tmp/old/src python benchmarks/loglinear_cpu.py \
        --json /tmp/old.json
    python benchmarks/loglinear_cpu.py --json benchmarks/results/loglinear_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess

import torch
from ops_cpu import best_time  # benchmarks/ is on the path when run as a script

import hippolm
from hippolm import ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2048,64;8192,64;4096,128", help="T,d pairs (B=1, H=4, chunk 64)")
    parser.add_argument("--start", type=int, default=0,
                        help="continue from slots at this position (chunked prefill), e.g. 24581")
    parser.add_argument("--label", default=None, help="a name for this run (default: the commit)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    rows = []
    for op in ("loglinear_ssd", "loglinear_gated_delta_rule"):
        fn = getattr(ops, op)
        for shape in args.shapes.split(";"):
            T, d = (int(x) for x in shape.split(","))
            H = 4
            q, v = torch.randn(1, T, H, d), torch.randn(1, T, H, d)
            k = torch.nn.functional.normalize(torch.randn(1, T, H, d), dim=-1)
            g = torch.nn.functional.logsigmoid(torch.randn(1, T, H) + 3)
            beta = torch.rand(1, T, H)
            L = ops.num_levels(args.start + T)
            lam = torch.rand(1, T, H, L) + 0.25
            leaves = [q, k, v, g, *([beta] if "delta" in op else []), lam]
            leaves = [x.requires_grad_() for x in leaves]
            state = None
            if args.start:  # random slots where a prefix of that length fills them
                full = [lv == 0 or ((args.start - 1) >> (lv - 1)) & 1 for lv in range(L)]
                slots = torch.randn(1, H, L, d, d) * torch.tensor(full, dtype=torch.float32)[:, None, None]
                state = ops.LogLinearState(slots, torch.tensor([args.start]))

            def fwd(leaves=leaves, fn=fn, state=state):
                with torch.no_grad():
                    fn(*leaves, initial_state=state, backend="torch", chunk_size=64)

            def fwd_bwd(leaves=leaves, fn=fn, state=state):
                o, _ = fn(*leaves, initial_state=state, backend="torch", chunk_size=64)
                torch.autograd.grad(o.sum(), leaves)

            row = {"op": op, "T": T, "d": d, "start": args.start, "fwd_s": round(best_time(fwd), 4),
                   "fwd_bwd_s": round(best_time(fwd_bwd), 4)}
            print(row, flush=True)
            rows.append(row)
    out = {"meta": {"label": args.label or commit, "hippolm_path": hippolm.__file__, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                    "date": datetime.date.today().isoformat(), "B": 1, "H": 4, "chunk": 64, "dtype": "float32"},
           "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
