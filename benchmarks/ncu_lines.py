"""Where the time goes inside a kernel: Nsight Compute's stall reasons and warp-stall samples.

Runs a command under ``ncu`` (clocks left alone), profiling the first ``--count`` launches whose
kernel name matches ``--kernels``; writes each profiled kernel's stall reasons (cycles per issued
instruction, from the raw page) and its SASS instructions with the most stall samples
(SourceCounters) to JSON and prints them; keeps the raw page (every metric) and each kernel's SASS
page as CSV (gzip) next to the JSON, the report in /tmp. The chunk kernels' first forward and backward:

    python benchmarks/ncu_lines.py --kernels '^_chunk_(fwd|bwd)$' --count 2 --json $OUT/ncu_chunk_h100.json -- \\
        python benchmarks/chunk_timing.py --configs default
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path


def ncu(*args: str) -> str:
    return subprocess.run(["ncu", *args], capture_output=True, text=True, check=True).stdout


def rows_of(text: str) -> list[dict]:
    """The CSV rows of an ncu page (its non-CSV preamble lines dropped; a page that repeats its
    header per kernel gives those headers as rows, which the readers below skip)."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if lines and lines[0].startswith(('"Kernel Name"', '"File Name"')):  # the source page's title line
        lines = lines[1:]
    return [{k: v for k, v in r.items() if k is not None} for r in csv.DictReader(io.StringIO("\n".join(lines)))]


def number(x: str | None) -> float | None:
    try:
        return float((x or "").replace(",", ""))
    except ValueError:
        return None


def stall_reasons(raw: list[dict]) -> dict[str, dict[str, float]]:
    """Kernel -> {stall reason: cycles per issued instruction} from the raw page (the
    smsp__average_warps_issue_stalled_<reason>_per_issue_active metrics), largest first."""
    out = {}
    for r in raw:
        name = r.get("Kernel Name", "")
        stalls = {}
        for k, v in r.items():
            if k.startswith("smsp__average_warps_issue_stalled_") and k.endswith("_per_issue_active.ratio"):
                val = number(v)
                if val:
                    stalls[k[len("smsp__average_warps_issue_stalled_"): -len("_per_issue_active.ratio")]] = val
        if stalls:
            out[f"{r.get('ID', '')}:{name[:60]}"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1]))
    return out


def samples_column(source: list[dict]) -> str | None:
    """The source page's column of warp-stall samples (all samples), None if it has none."""
    return next((k for r in source[:1] for k in r if "Stall Sampling (All" in k), None)


def hot_lines(source: list[dict], top: int) -> list[dict]:
    """The ``top`` rows of a source page by warp-stall samples (all samples)."""
    key = samples_column(source)
    if key is None:
        return [{"columns": list(source[0]) if source else []}]
    total = sum(number(r.get(key)) or 0 for r in source) or 1.0
    ranked = sorted(source, key=lambda r: number(r.get(key)) or 0, reverse=True)[:top]
    return [{"share": round((number(r.get(key)) or 0) / total, 4),
             **{k: v for k, v in r.items() if k in ("#", "Line No", "Address", "Source")}} for r in ranked]


def by_opcode(source: list[dict]) -> dict[str, float]:
    """Share of the warp-stall samples per SASS opcode (predicate and modifiers dropped)."""
    key = samples_column(source)
    if key is None:
        return {}
    sums: dict[str, float] = {}
    for r in source:
        words = (r.get("Source") or "").split()
        words = words[1:] if words[:1] and words[0].startswith("@") else words
        op = words[0].split(".")[0] if words else ""
        sums[op] = sums.get(op, 0.0) + (number(r.get(key)) or 0)
    total = sum(sums.values()) or 1.0
    return {k: round(v / total, 4) for k, v in sorted(sums.items(), key=lambda kv: -kv[1])[:20]}


def summarise(raw_rows: list[dict], pages: dict[str, str], top: int) -> dict:
    """Stall reasons per kernel, and per kernel page its hottest instructions and opcodes."""
    return {"stalls": stall_reasons(raw_rows),
            "opcodes": {name: by_opcode(rows_of(text)) for name, text in pages.items()},
            "lines": {name: hot_lines(rows_of(text), top) for name, text in pages.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", required=True, help="regex of the kernel names to profile")
    ap.add_argument("--count", type=int, default=1, help="launches to profile")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json", required=True)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    out = Path(args.json)
    rep = Path("/tmp") / out.stem
    ncu("--clock-control", "none", "--target-processes", "all", "--kernel-name", f"regex:{args.kernels}",
        "--launch-count", str(args.count), "--section", "WarpStateStats", "--section", "SourceCounters",
        "--section", "LaunchStats", "--section", "Occupancy", "--import-source", "yes", "--export", str(rep),
        "--force-overwrite", *command)
    report = f"{rep}.ncu-rep"
    raw = ncu("--import", report, "--page", "raw", "--csv")
    out.with_name(out.stem + "_raw.csv").write_text(raw)
    raw_rows = rows_of(raw)
    pages = {}
    for name in dict.fromkeys(r.get("Kernel Name", "") for r in raw_rows if r.get("ID", "").isdigit()):
        # per kernel: the SASS with its stall samples
        pages[name] = ncu("--import", report, "--kernel-name", name, "--page", "source", "--csv", "--print-source",
                          "sass")
        with gzip.open(out.with_name(f"{out.stem}_{name.strip('_')}_sass.csv.gz"), "wt") as f:
            f.write(pages[name])
    result = {"meta": {"date": datetime.date.today().isoformat(), "command": command, "kernels": args.kernels},
              **summarise(raw_rows, pages, args.top)}
    out.write_text(json.dumps(result, indent=1))
    for name, lines in result["lines"].items():
        print(f"--- {name}")
        for ln in lines if isinstance(lines, list) else [lines]:
            print(ln)
    for name, stalls in result["stalls"].items():
        print(name, dict(list(stalls.items())[:12]))


if __name__ == "__main__":
    sys.exit(main())
