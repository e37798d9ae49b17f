"""What storing the log-linear chunk reference's block summaries (hippolm.ops.loglinear._tree_reads:
each block's transition T and carried writes D) in a 16-bit type would cost in output error, for a
kernel that reads them from memory: float64 math, summaries rounded to --dtype, relative error of
the output against the unrounded float64 result (CPU, no GPU needed).

    python benchmarks/tree_precision.py --json benchmarks/results/tree_precision.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from functools import partial
from pathlib import Path

import torch

from hippolm import ops
from hippolm.ops import loglinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_inputs, rel_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096,128;16384,64", help="T,d pairs (B=1, H=2, chunk 64)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tree, rows = loglinear._tree_reads, []
    for op in ("loglinear_ssd", "loglinear_gated_delta_rule"):
        for shape in args.shapes.split(";"):
            T, d = (int(x) for x in shape.split(","))
            xs = make_inputs(op.removeprefix("loglinear_"), 1, T, 2, d, d, seed=2)
            lam = torch.rand(1, T, 2, ops.num_levels(T), generator=torch.Generator().manual_seed(3),
                             dtype=torch.float64) + 0.25
            ref, _ = getattr(ops, op)(*xs, lam, backend="torch", chunk_size=64)
            for name in args.dtypes.split(","):
                loglinear._tree_reads = partial(tree, summary_dtype=getattr(torch, name))
                try:
                    o, _ = getattr(ops, op)(*xs, lam, backend="torch", chunk_size=64)
                finally:
                    loglinear._tree_reads = tree
                row = {"op": op, "T": T, "d": d, "summaries": name, "rel_err": float(f"{rel_err(o, ref):.3g}")}
                print(row, flush=True)
                rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "B": 1,
                                "H": 2, "chunk": 64, "math": "float64"}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
