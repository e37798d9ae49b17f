"""What can be measured about our Triton kernels without a GPU, as JSON (--json):

* the bf16 dg error of log-linear Mamba-2 at T = 3000 under Triton's CPU interpreter, against the
  float64 reference of the rounded inputs, for the per-position prefix/suffix sum and for the
  suffix sum alone (the case of tests/test_kernels.py::test_loglinear_ssd_bf16_dg_on_a_long_sequence);
* the gradient errors of log-linear Gated DeltaNet with bf16 inputs under the interpreter (the fused
  chunk kernels' 16-bit products and the tree's bf16 summaries; before 2026-12-08 the level scans'
  bf16 states between the backward's scans and its gradient kernel).

The interpreter rounds float32 -> bf16 to nearest even as the GPU does
(hippolm.ops.triton_backend._patch_interpreter; from 2026-11-23 on, before it truncated).

Run: python benchmarks/kernel_cpu_checks.py --json benchmarks/results/kernel_cpu_checks.json
(--parts to run some; the JSON keeps the others).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


DG_CASE = r'''
import json, sys
sys.path.insert(0, "tests")
from test_kernels import _bf16_dg_long_case
from hippolm.ops import triton_loglinear as tl_
want, got = _bf16_dg_long_case()
def err(a, b): return ((a.double() - b).norm() / b.norm()).item()
out = {}
for name in ("prefix_or_suffix", "suffix_only"):
    if name == "suffix_only":
        tl_._dg_from_dgc = lambda dgc: dgc.double().flip(-1).cumsum(-1).flip(-1)
    dg = got()
    out[name] = {"dg_rel_err": err(dg, want), "dg_rel_err_chunk0": err(dg[:, :64], want[:, :64])}
print(json.dumps(out))
'''


# Log-linear GDN backward with bf16 inputs under the interpreter's bf16: gradient errors against the
# float64 reference of the rounded inputs (7 chunk levels).
GRADS_CASE = r'''
import json, sys, torch
sys.path.insert(0, "tests")
from test_kernels import _level_case
xs, run = _level_case(2048, seed=7, bf16=True, H=2, K=32)
want = run([x.clone().requires_grad_() for x in xs], "torch")[1]
def err(a, b): return ((a.double() - b).norm() / b.norm()).item()
got = run([x.to(torch.bfloat16 if i < 3 else torch.float32).requires_grad_() for i, x in enumerate(xs)], "triton")[1]
print(json.dumps({n: err(a, b) for n, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dlam"), got, want, strict=True)}))
'''


def interpreted(case: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "src"))
    run = subprocess.run([sys.executable, "-c", case], env=env, capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        raise RuntimeError(f"the interpreted case failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None, help="updated in place: the parts not run keep their results")
    ap.add_argument("--parts", default="dg,grads",
                    help="comma list of: dg (log-linear SSD bf16 dg), grads (log-linear GDN bf16 gradient errors)")
    args = ap.parse_args()
    import torch
    import triton

    parts = args.parts.split(",")
    out = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    runs = out.get("meta", {}).get("parts", {})  # part -> date it was last run
    runs.update(dict.fromkeys(parts, datetime.date.today().isoformat()))
    out["meta"] = {"device": "cpu (no GPU: Triton's interpreter)", "torch": torch.__version__,
                   "triton": triton.__version__, "parts": runs}
    if "dg" in parts:
        out["loglinear_ssd_bf16_dg_T3000_interpreter"] = interpreted(DG_CASE)
        print(json.dumps(out["loglinear_ssd_bf16_dg_T3000_interpreter"]))
    if "grads" in parts:
        out["loglinear_gdn_bf16_grads_interpreter"] = interpreted(GRADS_CASE)
        print(json.dumps(out["loglinear_gdn_bf16_grads_interpreter"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
