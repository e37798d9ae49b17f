"""Relative errors of our Triton kernels against the float64 reference on a CUDA GPU, per output
and per gradient, float32 and bf16, at the shapes of tests/test_kernels.py and longer ones.
A diagnostic to run when the CUDA tests fail: it prints every error instead of stopping at the
first assertion, and writes them to JSON.

    python benchmarks/kernel_errors.py --json $OUT/kernel_errors_h100.json
    python benchmarks/kernel_errors.py --op loglinear_gated_delta_rule --shapes "1,1000,4"
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_kernels as tk
from conftest import rel_err

SHAPES = [(1, 130, 2), (1, 300, 2), (1, 600, 2), (1, 1000, 1), (2, 1000, 16), (1, 3000, 4)]


def _by_chunk(got: torch.Tensor, want: torch.Tensor, chunk: int = 64) -> dict:
    """Where along the sequence the error sits: relative error of each 64-token chunk; the chunks
    over 1e-2 (index: error) and the worst one. A wrong tree level shows up as a pattern of chunk
    indices (e.g. every chunk with bit j set)."""
    err = (got.double() - want).transpose(0, 1).reshape(want.shape[1], -1)
    ref = want.transpose(0, 1).reshape(want.shape[1], -1)
    errs = []
    for c in range(0, want.shape[1], chunk):
        errs.append((err[c : c + chunk].norm() / ref[c : c + chunk].norm().clamp_min(1e-30)).item())
    bad = {i: round(e, 4) for i, e in enumerate(errs) if e > 1e-2}
    worst = max(range(len(errs)), key=errs.__getitem__)
    return {"bad": dict(list(bad.items())[:40]), "n_bad": len(bad), "worst": [worst, round(errs[worst], 4)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--shapes", default=None, help="B,T,H triples, e.g. '1,1000,1;1,3000,4' (default: all)")
    p.add_argument("--op", default="loglinear_ssd", choices=["loglinear_ssd", "loglinear_gated_delta_rule"])
    args = p.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")] if args.shapes else SHAPES
    dev = "cuda"
    rows = []
    run = _gdn_errors if args.op == "loglinear_gated_delta_rule" else _ssd_errors
    for B, T, H in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            row = {"op": args.op, "B": B, "T": T, "H": H, "dtype": str(dtype).split(".")[-1]}
            t0 = time.time()
            try:
                run(row, B, T, H, dtype, dev)
            except Exception as e:  # report it and go on to the next case
                row["error"] = f"{type(e).__name__}: {e}"[:400]
                traceback.print_exc()
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # after every case: a run cut short by its time limit keeps what it measured
                result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "date": datetime.date.today().isoformat(), "rows": rows}
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def _ssd_errors(row: dict, B: int, T: int, H: int, dtype: torch.dtype, dev: str) -> None:
    """Log-linear Mamba-2 (tests/test_kernels.py's inputs), against the float64 inputs and against
    the inputs as the kernel got them (the kernel's own error: what the tests check)."""
    xs = tk._inputs(B, T, H, 128, 128, seed=T)
    want = tk._reference(xs)
    o, _, grads = tk._run(xs, dtype, dev, chunk_size=64)
    row["o_vs_f64"], row["dg_vs_f64"] = rel_err(o.cpu(), want[0]), rel_err(grads[3].cpu(), want[2][3])
    ref = tk._reference(tk._rounded(xs, dtype))
    _record(row, o, grads, ref[0], ref[2], ("dq", "dk", "dv", "dg", "dlam"))


def _gdn_errors(row: dict, B: int, T: int, H: int, dtype: torch.dtype, dev: str) -> None:
    """Log-linear Gated DeltaNet (q, k, v in ``dtype``, gates and lam float32) against the float64
    reference of the rounded inputs: output and the gradients of a random weighting of it."""
    from conftest import make_inputs

    from hippolm import ops

    xs = make_inputs("gated_delta_rule", B, T, H, 128, 128, seed=T)
    xs.append(torch.rand(B, T, H, ops.num_levels(T) + 1, generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64) + 0.25)
    xs = [x.to(dtype).double() if i < 3 else x.float().double() for i, x in enumerate(xs)]
    w = torch.randn(B, T, H, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(leaves, backend, device):
        o, _ = ops.loglinear_gated_delta_rule(*leaves, backend=backend)
        return o, torch.autograd.grad((o.double() * w.to(device)).sum(), leaves)

    o_ref, g_ref = run([x.to(dev).requires_grad_() for x in xs], "torch", dev)
    leaves = [x.to(device=dev, dtype=dtype if i < 3 else torch.float32).requires_grad_() for i, x in enumerate(xs)]
    o, grads = run(leaves, "triton", dev)
    _record(row, o, grads, o_ref, g_ref, ("dq", "dk", "dv", "dg", "dbeta", "dlam"))


def _record(row: dict, o, grads, o_ref, g_ref, names) -> None:
    row["o"] = rel_err(o.cpu(), o_ref.cpu())
    row["o_by_chunk"] = _by_chunk(o.cpu(), o_ref.cpu())
    for name, a, b in zip(names, grads, g_ref, strict=True):
        row[name] = rel_err(a.cpu(), b.cpu())
        row[name + "_by_chunk"] = _by_chunk(a.cpu(), b.cpu())


if __name__ == "__main__":
    main()
