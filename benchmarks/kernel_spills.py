"""Registers and spill stack of the log-linear Mamba-2 and Gated DeltaNet kernels (or the AHN memory's
cached decode step, ``--op memory_step``) compiled for sm_90, on a machine without a GPU: Triton
compiles for the target and its bundled cuobjdump reads the cubin's resource usage. A kernel that
spills (STACK > 0) pays local-memory traffic its bytes and FLOPs do not predict, so this is where to
look before spending GPU time on a timing (bf16 inputs, head dim 128, the host's tiles).

    python benchmarks/kernel_spills.py --set triton_loglinear.GRAD_OPERANDS=2 --json out.json

``--lines N``: per kernel, the N source lines with the most spill instructions (local-memory stores
STL and loads LDL in the SASS, attributed by the bundled nvdisasm's line info): where a tile is kept
live too long. A tile the compiler keeps across a long stretch (even one recomputed on purpose:
identical pure ops are merged) shows up at the line that makes it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from flag_timing import set_options  # benchmarks/ is on the path when run as a script
from test_kernel_compile import (  # tests/: the compile helpers
    chunk_kernel_compiled,
    loglinear_mamba2_compiled,
    memory_step_compiled,
    tree_kernels_compiled,
)

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
NVDISASM = CUOBJDUMP.with_name("nvdisasm")


def _cubin_tool(kernel, *command: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([*command, f.name], capture_output=True, text=True, check=True).stdout


def usage(kernel) -> dict:
    out = _cubin_tool(kernel, str(CUOBJDUMP), "--dump-resource-usage")
    regs, stack = re.search(r"REG:(\d+).*?STACK:(\d+)", out).groups()
    return {"regs": int(regs), "stack_bytes": int(stack), "shared_bytes": kernel.metadata.shared}


def spill_lines(kernel) -> Counter:
    """(file name, line) -> number of spill instructions (STL + LDL) the SASS attributes to it."""
    counts, where = Counter(), None
    for text in _cubin_tool(kernel, str(NVDISASM), "-g", "-c").splitlines():
        if m := re.search(r'## File "([^"]+)", line (\d+)', text):
            where = (Path(m.group(1)).name, int(m.group(2)))
        elif re.search(r"\b(STL|LDL)\b", text):
            counts[where] += 1
    return counts


def _rows(named: list, lines: int) -> list[dict]:
    rows = []
    for name, kernel in named:
        row = {"kernel": name, "warps": kernel.metadata.num_warps, **usage(kernel)}
        if lines:
            row["spill_lines"] = [f"{f}:{n} {c}" for (f, n), c in spill_lines(kernel).most_common(lines)]
        rows.append(row)
    return rows


def loglinear_ssd_kernels(warps: int | None, lines: int = 0) -> list[dict]:
    return _rows(loglinear_mamba2_compiled(9, warps), lines)


def loglinear_gdn_kernels(warps: int | None, lines: int = 0) -> list[dict]:
    """The fused chunk kernels and the tree's kernels at head dim 128, chunks of 64, bf16 inputs."""
    named = [*((f"_chunk_{which}", chunk_kernel_compiled(which, "tf32", 9, warps))
               for which in ("fwd", "bwd", "bwd_qk")),
             *tree_kernels_compiled("tf32", 9, warps)]
    return _rows(named, lines)


def memory_step_kernels(warps: int | None, lines: int = 0) -> list[dict]:
    """The AHN memory's cached decode step with its read-out projection."""
    return _rows([("_memory_step_cache_kernel", memory_step_compiled(9, True, warps))], lines)


OPS = {"loglinear_ssd": loglinear_ssd_kernels, "loglinear_gated_delta_rule": loglinear_gdn_kernels,
       "memory_step": memory_step_kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--op", default="loglinear_ssd", choices=list(OPS))
    parser.add_argument("--set", action="append", default=[], metavar="module.ATTRIBUTE=INT",
                        help="a module-level kernel option under hippolm.ops, e.g. triton_loglinear.GRAD_OPERANDS=2")
    parser.add_argument("--warps", type=int, default=None, help="default: the host's choice")
    parser.add_argument("--lines", type=int, default=0, help="also the N source lines with the most spill instructions")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_options(args.set)
    rows = OPS[args.op](args.warps, args.lines)
    for r in rows:
        print(r)
    if args.json:
        meta = {"op": args.op, "target": "sm_90", "triton": triton.__version__,
                "date": datetime.date.today().isoformat(), "dtype": "bfloat16", "head_dim": 128, "set": args.set}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
