"""Registers and spill stack of the log-linear Mamba-2 and Gated DeltaNet kernels compiled for sm_90,
on a machine without a GPU: Triton compiles for the target and its bundled cuobjdump reads the cubin's resource usage. A
kernel that spills (STACK > 0) pays local-memory traffic its bytes and FLOPs do not predict, so this
is where to look before spending GPU time on a timing (bf16 inputs, head dim 128, the host's tiles).

    python benchmarks/kernel_spills.py --set GRAD_OPERANDS=2 --set KV_V_PIECES=2 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_kernel_compile import OPERAND_PTRS, _compile, loglinear_mamba2_compiled  # tests/: the compile helpers

from hippolm.ops import triton_gdn, triton_gdn_chunk
from hippolm.ops import triton_loglinear as tll

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def usage(kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs, stack = re.search(r"REG:(\d+).*?STACK:(\d+)", out).groups()
    return {"regs": int(regs), "stack_bytes": int(stack), "shared_bytes": kernel.metadata.shared}


def loglinear_ssd_kernels(warps: int | None) -> list[dict]:
    return [{"kernel": name, "warps": kernel.metadata.num_warps, **usage(kernel)}
            for name, kernel in loglinear_mamba2_compiled(9, warps)]


def loglinear_gdn_kernels(warps: int | None) -> list[dict]:
    """The level kernels of both lanes at 64k tokens in chunks of 64 (forward: first group and the
    others), the level gradient kernel and the fused chunk kernels, bf16 inputs (TF32 level dots)."""
    rows = []

    def add(name, fn, consts, options, ptrs):
        options = options | ({"num_warps": warps} if warps else {})
        kernel = _compile(fn, consts, options, 9, "bf16", ptrs)
        rows.append({"kernel": name, "warps": options["num_warps"], **usage(kernel)})

    for which, fn in (("fwd", triton_gdn._level_fwd), ("bwd", triton_gdn._level_bwd)):
        lanes = triton_gdn._level_lanes(1024, 10, 128, 128, which, "tf32")
        variants = [{}] if which == "bwd" else [{"FIRST": True, "HAS_O0": True}, {"FIRST": False, "HAS_O0": False}]
        for lane_name, lane in zip(("main", "top"), lanes, strict=True):
            for extra in variants:
                tag = "" if not extra else ("first" if extra["FIRST"] else "rest")
                add(f"_level_{which} {lane_name} {tag} NL={lane.NL} BV={lane.BV}".replace("  ", " "), fn,
                    {"C": 64, "BK": lane.BK, "BV": lane.BV, "NL": lane.NL, "PREC": "tf32", **extra},
                    triton_gdn._level_launch("tf32", 9, which == "bwd"), OPERAND_PTRS)
    add("_level_grads", triton_gdn._level_grads,
        {"C": 64, "BK": 128, "BV": triton_gdn.LEVEL_GRADS["tf32"]["BV"], "JP": 16, "PREC": "tf32"},
        triton_gdn._grads_launch("tf32", 9), OPERAND_PTRS)
    tc = triton_gdn_chunk
    for which in ("fwd", "bwd"):
        BK, BV = tc._blocks(128, 128, which)
        consts = {"C": 64, "CB": 6, "BK": BK, "BV": BV, "PREC": "tf32"} | (
            {"HAS_DMIX": True} if which == "bwd" else {"SOLVE": tc.CHUNK_TILES["fwd"]["solve"]})
        add(f"_chunk_{which}", tc._chunk_fwd if which == "fwd" else tc._chunk_bwd, consts, tc._launch(which),
            ("q_ptr", "k_ptr", "v_ptr", "w_ptr", "u_ptr", "kd_ptr", "qw_ptr", "dq_ptr", "dk_ptr", "dv_ptr",
             "dw_ptr", "du_ptr", "dkd_ptr", "dqw_ptr"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--op", default="loglinear_ssd", choices=["loglinear_ssd", "loglinear_gated_delta_rule"])
    parser.add_argument("--set", action="append", default=[], metavar="ATTR=INT",
                        help="a module-level option of hippolm.ops.triton_loglinear, e.g. GRAD_OPERANDS=2")
    parser.add_argument("--warps", type=int, default=None, help="default: the host's choice")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    for item in args.set:
        attr, value = item.split("=")
        setattr(tll, attr, int(value))
    rows = (loglinear_ssd_kernels if args.op == "loglinear_ssd" else loglinear_gdn_kernels)(args.warps)
    for r in rows:
        print(r)
    if args.json:
        meta = {"op": args.op, "target": "sm_90", "triton": triton.__version__,
                "date": datetime.date.today().isoformat(), "dtype": "bfloat16", "head_dim": 128, "set": args.set}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
