"""Where the time goes inside a kernel: Nsight Compute's warp-stall samples per source line.

Runs a command under ``ncu`` (clocks left alone), profiling the first ``--count`` launches whose
kernel name matches ``--kernels``, then writes for each profiled kernel its stall reasons (the
WarpStateStats section) and the source lines with the most stall samples (SourceCounters; Triton
kernels carry their Python lines) to JSON, and prints the top lines; the per-line CSV page
(Python lines) is kept next to the JSON, the report in /tmp. One kernel per run (the source page
is per kernel). For the first forward launch of the log-linear GDN chunk kernels:

    python benchmarks/ncu_lines.py --kernels '^_chunk_fwd$' --json $OUT/ncu_chunk_fwd_h100.json -- \\
        python benchmarks/chunk_timing.py --configs default
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import subprocess
import sys
from pathlib import Path


def ncu(*args: str) -> str:
    return subprocess.run(["ncu", *args], capture_output=True, text=True, check=True).stdout


def rows_of(text: str) -> list[dict]:
    """The CSV rows of an ncu page (its non-CSV preamble lines dropped)."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


def stall_reasons(details: list[dict]) -> dict[str, dict[str, float]]:
    """Kernel -> {stall metric name: value} of the WarpStateStats section."""
    out: dict[str, dict[str, float]] = {}
    for r in details:
        if r.get("Section Name") != "Warp State Statistics":
            continue
        name = f"{r.get('ID', '')}:{r.get('Kernel Name', '')[:60]}"
        try:
            out.setdefault(name, {})[r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
    return out


def hot_lines(source: list[dict], top: int) -> list[dict]:
    """The ``top`` source lines by warp-stall samples (all samples), with every sampled column."""
    key = next((k for k in (source[0] if source else {}) if "Warp Stall Sampling (All" in k), None)
    if key is None:
        return []

    def samples(r: dict) -> float:
        try:
            return float(r[key].replace(",", "") or 0)
        except ValueError:
            return 0.0

    total = sum(samples(r) for r in source) or 1.0
    ranked = sorted(source, key=samples, reverse=True)[:top]
    return [{"share": round(samples(r) / total, 4), "line": r.get("#", r.get("Line", "")),
             "source": (r.get("Source") or "").strip()[:160]} for r in ranked]


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
    details = ncu("--import", report, "--page", "details", "--csv")
    result = {"meta": {"date": datetime.date.today().isoformat(), "command": command, "kernels": args.kernels},
              "stalls": stall_reasons(rows_of(details)), "launch": {}, "lines": {}}
    for r in rows_of(details):
        if r.get("Section Name") in ("Launch Statistics", "Occupancy"):
            result["launch"].setdefault(f"{r.get('ID', '')}:{r.get('Kernel Name', '')[:60]}", {})[
                r["Metric Name"]] = r["Metric Value"]
    for view in ("cuda", "sass"):
        try:
            text = ncu("--import", report, "--page", "source", "--csv", "--print-source", view)
        except subprocess.CalledProcessError as err:
            result["lines"][view] = f"ncu failed: {err.stderr[-300:]}"
            continue
        if view == "cuda":
            out.with_name(f"{out.stem}_lines.csv").write_text(text)
        result["lines"][view] = hot_lines(rows_of(text), args.top)
    out.write_text(json.dumps(result, indent=1))
    for view, lines in result["lines"].items():
        print(f"--- {view}")
        for ln in lines if isinstance(lines, list) else [lines]:
            print(ln)
    for name, stalls in result["stalls"].items():
        print(name, {k: v for k, v in stalls.items() if v})


if __name__ == "__main__":
    sys.exit(main())
