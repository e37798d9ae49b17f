"""No GPU needed: the log-linear GDN chunk kernels and the tree's node gradients compiled here for
sm_90 (Triton's bundled ptxas, the launch's specialisation), then

* per variant, counts of the SASS instructions that mark cross-thread traffic and fences (barriers,
  shuffles, shared stores/loads, global atomics and the fences around them);
* the warp-stall samples of a GPU run of ``ncu_lines.py`` (its gzipped SASS pages in
  benchmarks/results/) summed per source line, through the line info of the same kernel compiled
  here: exact where the instruction counts agree (checked; else the line table is left out).

    python benchmarks/sass_lines.py --json benchmarks/results/sass_lines_sm90.json
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from kernel_spills import NVDISASM, _cubin_tool  # noqa: E402  (benchmarks/ is on the path as a script)
from test_kernel_compile import tree_kernels_compiled  # noqa: E402

from hippolm.ops import triton_gdn_chunk as tc  # noqa: E402

OPS = ("BAR", "SHFL", "STS", "LDS", "LDG", "ATOMG", "REDG", "ERRBAR", "CCTL", "MEMBAR")
INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+[A-Z@]")


def chunk_kernel(which: str, solve: str = "merge"):
    """The chunk kernel as chunk_timing.py launches it (bf16 inputs, float32 do, no dmix; n, H, K, V
    divisible by 16)."""
    fn = tc._chunk_fwd if which == "fwd" else tc._chunk_bwd
    bf16 = ("q_ptr", "k_ptr", "v_ptr", "w_ptr", "u_ptr", "kd_ptr", "qw_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "dw_ptr",
            "du_ptr", "dkd_ptr", "dqw_ptr", "cc_ptr")
    BK, BV = tc._blocks(128, 128, which)
    consts = {"C": 64, "CB": 6, "BK": BK, "BV": BV, "PREC": "tf32"}
    consts |= {"SOLVE": solve} if which == "fwd" else {"HAS_DMIX": False}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = ("*bf16" if name in bf16 else "*fp32" if name.endswith("_ptr")
                     else "fp32" if name == "scale" else "i32")
        if name.endswith("_ptr") or name in ("n", "H", "K", "V"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    opts = {"num_warps": tc.CHUNK_TILES[which]["num_warps"], "num_stages": tc.CHUNK_TILES[which]["num_stages"]}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)


def counts(kernel) -> dict[str, int]:
    sass = _cubin_tool(kernel, str(NVDISASM), "-c")
    out = {op: len(re.findall(rf"\b{op}\b", sass)) for op in OPS}
    out["instructions"] = sum(1 for line in sass.splitlines() if INSTR.search(line))
    return out


def line_table(kernel, page: Path, top: int) -> dict:
    """Stall samples of a committed SASS page per source line of ``kernel``'s line info."""
    where, offset_line = None, {}
    for line in _cubin_tool(kernel, str(NVDISASM), "-c", "-g").splitlines():
        m = re.search(r'//## File "([^"]+)", line (\d+)', line)
        if m:
            where = f"{Path(m.group(1)).name}:{m.group(2)}"
        elif m := INSTR.search(line):
            offset_line[int(m.group(1), 16)] = where
    with gzip.open(page, "rt") as f:
        rows = list(csv.DictReader(f.read().splitlines()[1:]))  # after the page's title line
    if len(rows) != len(offset_line):
        return {"error": f"{len(rows)} instructions in the page, {len(offset_line)} compiled here"}
    base, key = int(rows[0]["Address"], 16), "Warp Stall Sampling (All Samples)"
    sums: dict[str, float] = defaultdict(float)
    for r in rows:
        sums[offset_line.get(int(r["Address"], 16) - base) or "?"] += float(r[key])
    total = sum(sums.values()) or 1.0
    import triton.language.standard as standard  # tl.sum, tl.cumsum and their combine functions

    files = {p.name: p.read_text().splitlines() for p in (ROOT / "src/hippolm/ops").glob("*.py")}
    files["standard.py"] = Path(standard.__file__).read_text().splitlines()

    def text(loc: str) -> str:
        name, _, no = loc.partition(":")
        return files[name][int(no) - 1].strip()[:100] if name in files else ""

    ranked = sorted(sums.items(), key=lambda kv: -kv[1])[:top]
    return {"instructions": len(rows), "lines": [{"share": round(s / total, 4), "at": loc, "source": text(loc)}
                                                 for loc, s in ranked]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = ROOT / "benchmarks/results"
    out = {"meta": {"triton": triton.__version__, "target": "sm_90", "date": datetime.date.today().isoformat(),
                    "pages": "ncu_chunk_h100_chunk_{fwd,bwd}_sass.csv.gz (solve merge)"},
           "counts": {}, "sampled_lines": {}}
    for solve in ("merge", "merge_loads"):
        out["counts"][f"_chunk_fwd solve={solve}"] = counts(chunk_kernel("fwd", solve))
    out["counts"]["_chunk_bwd"] = counts(chunk_kernel("bwd"))
    for name, kernel in tree_kernels_compiled("tf32", 9):
        if name.startswith("_tree_node_grads"):
            out["counts"][name] = counts(kernel)
    for which in ("fwd", "bwd"):
        page = res / f"ncu_chunk_h100_chunk_{which}_sass.csv.gz"
        out["sampled_lines"][f"_chunk_{which}"] = line_table(chunk_kernel(which), page, args.top)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
