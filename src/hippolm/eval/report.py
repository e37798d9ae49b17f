"""Summary tables (markdown + CSV) and needle heat maps.

A summary row is ``{"task", "group", "metric", "system", "value", "n"}``: ``group`` is the
length of a needle cell, the dataset of a benchmark file or the position bucket of perplexity.
The tables put one system per column so full attention, SWA-only and AHN read side by side.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

SUMMARY_JSON = "summary.json"


def mean_by(results: list[dict], *keys: str, value: str = "score") -> dict[tuple, tuple[float, int]]:
    """Mean of ``value`` per combination of ``keys``: {(k1, k2, ...): (mean, count)}."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        acc[tuple(r[k] for k in keys)].append(float(r[value]))
    return {k: (sum(v) / len(v), len(v)) for k, v in acc.items()}


def merge_summary(out_dir: str | Path, rows: list[dict]) -> list[dict]:
    """Add ``rows`` to ``out_dir/summary.json`` (replacing rows with the same task, group, metric
    and system) and return all rows."""
    path = Path(out_dir) / SUMMARY_JSON
    existing = json.loads(path.read_text()) if path.is_file() else []
    key = lambda r: (r["task"], str(r["group"]), r["metric"], r["system"])  # noqa: E731
    merged = {key(r): r for r in existing}
    merged.update({key(r): r for r in rows})
    out = list(merged.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


def _fmt(value: float, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if metric in ("ppl", "nll"):
        return f"{value:.3f}"
    return f"{100 * value:.1f}"  # scores in [0, 1] shown as percent


def _pivot(rows: list[dict]) -> tuple[list[str], list[tuple], dict]:
    systems: list[str] = []
    for r in rows:
        if r["system"] not in systems:
            systems.append(r["system"])
    order = {"full": 0, "swa": 1, "ahn": 2}
    systems.sort(key=lambda s: order.get(s, 3))
    lines: list[tuple] = []
    cells: dict = {}
    for r in rows:
        line = (r["task"], str(r["group"]), r["metric"])
        if line not in cells:
            lines.append(line)
            cells[line] = {}
        cells[line][r["system"]] = r
    return systems, lines, cells


def summary_markdown(rows: list[dict]) -> str:
    """One line per (task, group, metric), one column per system; scores in percent, ppl as is."""
    systems, lines, cells = _pivot(rows)
    head = "| task | group | metric | " + " | ".join(systems) + " | n |"
    out = [head, "|" + "---|" * (4 + len(systems))]
    for line in lines:
        row = cells[line]
        n = max(int(r.get("n", 0)) for r in row.values())
        vals = [_fmt(row[s]["value"], line[2]) if s in row else "" for s in systems]
        out.append(f"| {line[0]} | {line[1]} | {line[2]} | " + " | ".join(vals) + f" | {n} |")
    return "\n".join(out) + "\n"


def summary_csv(rows: list[dict]) -> str:
    """Long format: task, group, metric, system, value (raw: scores in [0, 1]), n."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "group", "metric", "system", "value", "n"])
    for r in rows:
        w.writerow([r["task"], r["group"], r["metric"], r["system"], r["value"], r.get("n", "")])
    return buf.getvalue()


def write_summary(out_dir: str | Path, rows: list[dict]) -> dict[str, Path]:
    """Merge ``rows`` into the folder's summary and (re)write summary.md and summary.csv."""
    out_dir = Path(out_dir)
    rows = merge_summary(out_dir, rows)
    md, cs = out_dir / "summary.md", out_dir / "summary.csv"
    md.write_text(summary_markdown(rows))
    cs.write_text(summary_csv(rows))
    return {"markdown": md, "csv": cs, "json": out_dir / SUMMARY_JSON}


def heatmap(results: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Mean score (percent) per (depth, length) cell as a PNG: lengths on x, depths on y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no results to plot.")
    cells = mean_by(results, "depth", "length")
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    grid = [[100 * cells[(d, n)][0] if (d, n) in cells else float("nan") for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2.5, 0.55 * len(depths) + 1.8))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not math.isnan(grid[i][j]):
                ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="score (%)")
    ax.set_title(title or results[0].get("task", "needle"))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
