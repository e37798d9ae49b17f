"""What can be measured about our Triton kernels without a GPU, as JSON (--json):

* shared memory of the log-linear Gated DeltaNet level kernels compiled for sm_90 and sm_80 (Triton's
  bundled ptxas) for several tilings (levels per program x V columns per level), with the launch
  options the host picks;
* the bf16 dg error of log-linear Mamba-2 at T = 3000 under Triton's CPU interpreter, against the
  float64 reference of the rounded inputs, for the per-position prefix/suffix sum and for the
  suffix sum alone (the case of tests/test_kernels.py::test_loglinear_ssd_bf16_dg_on_a_long_sequence).

Run: python benchmarks/kernel_cpu_checks.py --json benchmarks/results/kernel_cpu_checks.json (~2 min).
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


def shared_memory() -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_kernel_compile import _compile

    from hippolm.ops import triton_gdn

    rows = []
    for which in ("fwd", "bwd"):
        for prec, major in (("tf32", 9), ("tf32", 8), ("ieee", 9), ("ieee", 8)):
            for NL, BV in ((4, 32), (2, 64), (2, 32), (1, 64), (1, 32)):
                row = {"kernel": which, "operands": "bf16" if prec == "tf32" else "fp32", "sm": major * 10,
                       "levels": NL, "BV": BV, **triton_gdn._level_launch(prec, major, which == "bwd")}
                try:
                    k = _compile(triton_gdn._level_fwd if which == "fwd" else triton_gdn._level_bwd,
                                 {"C": 64, "BK": 128, "BV": BV, "NL": NL, "PREC": prec},
                                 triton_gdn._level_launch(prec, major, which == "bwd"), major, row["operands"],
                                 ("w_ptr", "u_ptr", "kd_ptr", "qw_ptr", "hs_ptr", "dw_ptr", "dkd_ptr", "dqw_ptr"))
                    row["shared_bytes"] = k.metadata.shared
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {str(err)[-200:]}"
                print(row, flush=True)
                rows.append(row)
    return rows


DG_CASE = r'''
import json, torch
from hippolm import ops
from hippolm.ops import triton_loglinear as tl_
T, H, D = 3000, 2, 16
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, T, H, D, generator=gen, dtype=torch.float64) for _ in range(3))
k = torch.nn.functional.normalize(k, dim=-1)
g = torch.nn.functional.logsigmoid(torch.randn(1, T, H, generator=gen, dtype=torch.float64) + 3)
lam = torch.rand(1, T, H, ops.num_levels(T), generator=gen, dtype=torch.float64) + 0.25
w = torch.randn(1, T, H, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
def dg(leaves, backend):
    o, _ = ops.loglinear_ssd(*leaves, backend=backend, chunk_size=64)
    return torch.autograd.grad((o.double() * w).sum(), leaves[3])[0]
want = dg([*(x.to(torch.bfloat16).double() for x in (q, k, v)), g.clone().requires_grad_(), lam], "torch")
def err(a, b): return ((a.double() - b).norm() / b.norm()).item()
out = {}
for name in ("prefix_or_suffix", "suffix_only"):
    if name == "suffix_only":
        tl_._dg_from_dgc = lambda dgc: dgc.double().flip(-1).cumsum(-1).flip(-1)
    got = dg([*(x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)), g.float().requires_grad_(),
              lam.float()], "triton")
    out[name] = {"dg_rel_err": err(got, want), "dg_rel_err_chunk0": err(got[:, :64], want[:, :64])}
print(json.dumps(out))
'''


def dg_interpreter() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "src"))
    run = subprocess.run([sys.executable, "-c", DG_CASE], env=env, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch
    import triton

    out = {"meta": {"device": "cpu (no GPU: compiled for sm_90/sm_80, interpreter)", "torch": torch.__version__,
                    "triton": triton.__version__, "date": datetime.date.today().isoformat()},
           "level_kernel_shared_memory": shared_memory(), "loglinear_ssd_bf16_dg_T3000_interpreter": dg_interpreter()}
    print(json.dumps(out["loglinear_ssd_bf16_dg_T3000_interpreter"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
