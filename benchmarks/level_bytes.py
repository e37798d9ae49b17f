"""Bytes that log-linear Gated DeltaNet's level kernels (hippolm.ops.triton_gdn._LevelReads) load and
store per launch, counted from what each kernel reads and writes at the tiles of a configuration
(no GPU needed), and, given a `benchmarks/level_timing.py` JSON, the bandwidth each launch of that
run achieved with those bytes (against the H100's 3.0 TB/s): which launches are bandwidth-bound.

Counted at the memory interface of each program, with no reuse between programs (what the
kernels would move if the L2 cache served nothing): a launch above 100% got part of its loads
from L2. Masked-off columns (levels that do not write / read a chunk) are not counted.

    python benchmarks/level_bytes.py --timing benchmarks/results/level_timing_h100_fwd_tiles.json \
        --config "4x16+2x32@2w4/2x64+2x64@2" --json benchmarks/results/level_bytes_h100.json
"""

from __future__ import annotations

import argparse
import json

import triton
from level_timing import configure  # benchmarks/ is on the path when run as a script

from hippolm.ops import triton_gdn as tg

F32 = 4


def _reads(i: int, j: int) -> bool:
    return (i >> j) & 1 == 1


def level_fwd(n: int, NH: int, K: int, C: int, op: int, lane, first: bool, has_o0: bool, group) -> int:
    """One launch of _level_fwd: per program (segment, V tile) per chunk w, kd, ge, the writing
    levels' u columns, and where a level of the group reads: qw, lam, o (read unless first, written)."""
    j0, top, _ = group
    levels = range(j0, top + 1)
    total = 0
    for i in range(n):  # the segments of 2^(top+1) chunks cover every chunk once
        b = 2 * C * K * op + F32  # w, kd, ge
        b += sum(C * lane.BV * op for j in levels if not _reads(i, j))  # u, writing levels
        readers = [j for j in levels if _reads(i, j)]
        if readers:
            b += C * K * op + C * len(readers) * F32 + C * lane.BV * F32 * (1 if first else 2)
        elif first:
            b += C * lane.BV * F32
        if first and has_o0:
            b += C * lane.BV * F32
        total += b * lane.NV
    return total * NH


def level_bwd(n: int, NH: int, K: int, C: int, op: int, do_b: int, lane, group) -> int:
    """One launch of _level_bwd (both scans): the recompute scan stores each chunk's live level states
    and reads w, kd, ge and the writing levels' u; the reverse scan stores the state gradients and
    reads w, kd, ge and, where a level reads, qw, lam and do's columns (do_b bytes each) per reading level."""
    j0, top, _ = group
    levels = range(j0, top + 1)
    total = 0
    for i in range(n):  # the segments of 2^(top+1) chunks cover every chunk once
        store = len(levels) * K * lane.BV * op
        common = 2 * C * K * op + F32
        hs = store + common + sum(C * lane.BV * op for j in levels if not _reads(i, j))
        readers = [j for j in levels if _reads(i, j)]
        hd = store + common
        if readers:
            hd += C * K * op + len(readers) * (C * F32 + C * lane.BV * do_b)
        total += (hs + hd) * lane.NV
    return total * NH


def level_grads(n: int, NH: int, K: int, V: int, C: int, J: int, op: int, do_b: int) -> int:
    """_level_grads: per chunk kd, qw, w, u, do (do_b bytes each), every level's state and state gradient,
    lam of the reading levels; stores du, dw, dkd, dqw, dge, dlam."""
    total = 0
    for i in range(n):
        readers = sum(_reads(i, j) for j in range(J))
        loads = 3 * C * K * op + C * V * op + C * V * do_b + J * 2 * K * V * op + readers * C * F32
        stores = C * V * op + 3 * C * K * op + F32 + C * J * F32
        total += loads + stores
    return total * NH


def tree_build(n: int, K: int, V: int, C: int, J: int, op: int, leaves: bool = True) -> int:
    """triton_gdn_tree.build_tree, per sequence-head: per leaf w, kd, u, ge read and its summary
    [K, K + V] stored (operand type); per merge T_right, the left node and D_right read and the node
    stored (every node: the backward reads the odd ones' T too). Without ``leaves``: no leaf stored,
    each node of height 1 reads its two chunks' w, kd, u, ge instead."""
    W = K + V
    sizes = [n >> h for h in range(J)]
    factors = 2 * C * K * op + C * V * op + F32
    merges = sum(sizes[1:]) * (K * K + 2 * K * W + K * W) * op
    if leaves:
        return n * (factors + K * W * op) + merges
    h1 = sizes[1] if J > 1 else 0
    return merges + h1 * (2 * factors - (K * K + 2 * K * W) * op)


def tree_fwd(n: int, NH: int, K: int, V: int, C: int, J: int, op: int, leaves: bool = True) -> int:
    """The forward as triton_gdn_tree.tree_reads runs it: the tree built (:func:`tree_build`); chunk i
    reads qw, lam, o0 (the output's type, as op here), one D per set bit, one T per set bit but the last, and writes o
    (operand type); without ``leaves`` level 0 reads chunk i - 1's kd and u (D) and w (T)."""
    reads = 0
    for i in range(n):
        bits = bin(i).count("1")
        reads += C * K * op + C * J * F32 + 2 * C * V * op + bits * K * V * op
        reads += max(0, bits - 1) * K * K * op
        if not leaves and i & 1:
            reads += (C * K + C * V - K * V) * op + (F32 + (C * K - K * K) * op if bits > 1 else 0)
    return (tree_build(n, K, V, C, J, op, leaves) + reads) * NH


def tree_bwd(n: int, NH: int, K: int, V: int, C: int, J: int, op: int, do_b: int = F32, readers: int = 16,
             leaves: bool = True) -> int:
    """:func:`tree_bwd_parts` summed."""
    return sum(tree_bwd_parts(n, NH, K, V, C, J, op, do_b, readers, leaves).values())


def tree_bwd_parts(n: int, NH: int, K: int, V: int, C: int, J: int, op: int, do_b: int = F32, readers: int = 16,
                   leaves: bool = True) -> dict[str, int]:
    """Per phase, the backward as triton_gdn_tree.tree_backward runs it (summaries, pairs and the gradients of
    heights >= 1 in the operand type, float32 where several programs add up a node: 2^h > readers),
    a tile that one program or a program's adjacent column tiles load again counted once (L2), every
    other load counted: the tree rebuilt (:func:`tree_build`); per chunk qw, do, lam,
    per set bit a T carried (all but the last), qb and dqa stored, T^T and D read, dqw and dlam
    stored; per node of height >= 1 its gradient stored, the parent's gradient row and T_right (left)
    or M_left (right), and per reader chunk its qb, dqa, do and lam; per leaf the same but nothing
    stored, then kd, w, u read and dw, dkd, du, dge stored. Without ``leaves`` (none stored): level 0's
    T and D come as chunk i - 1's kd, w, u, and a leaf's sibling T_right / M_left as its kd, w / kd, w, u."""
    W = K + V
    sizes = [n >> h for h in range(J)]
    dm_b = [F32 if (1 << h) > readers else op for h in range(J)]
    build = tree_build(n, K, V, C, J, op, leaves)
    chunks = 0
    for i in range(n):
        p = bin(i & ((1 << J) - 1)).count("1")
        chunks += C * K * op + C * V * do_b + C * J * F32 + max(0, p - 1) * K * K * op  # qw, do, lam, the carry
        chunks += p * (2 * C * K * op + K * K * op + K * V * op)  # qb, dqa stored; T^T, D
        if not leaves and i & 1:  # level 0 from kd, w, u (the carry's and the read's loads alike, L2)
            chunks += (2 * C * K + C * V - K * K - K * V) * op - (K * K * op if p > 1 else 0)
        chunks += C * K * op + C * J * F32  # dqw, dlam
    nodes = 0
    for h, n_h in enumerate(sizes):
        n_up = sizes[h + 1] if h + 1 < J else 0
        for m in range(n_h):
            nodes += K * W * dm_b[h] if h else 0  # stored (or added); a leaf's is not
            if m < 2 * n_up:
                if h or leaves:  # T_right or M_left, else their factors
                    sibling = K * K if m % 2 == 0 else K * W
                else:
                    sibling = 2 * C * K if m % 2 == 0 else 2 * C * K + C * V
                nodes += K * W * dm_b[h + 1] + sibling * op
            if m % 2 == 0:
                n_readers = max(0, min((m + 2) << h, n) - ((m + 1) << h))
                nodes += n_readers * (2 * C * K * op + C * V * do_b + C * F32)
    leaf_grads = n * (2 * C * K * op + C * V * op + 2 * C * K * op + C * V * op + F32)
    return {"rebuild": build * NH, "pairs": chunks * NH, "node_grads": nodes * NH, "leaf_grads_io": leaf_grads * NH}


def count(T: int, H: int, d: int, C: int, op: int, prec: str) -> dict:
    """Bytes per launch, in launch order per pass and lane (as level_timing.py's ``groups``)."""
    n = T // C
    J = (n - 1).bit_length()
    do_b = F32 if tg.LEVEL_DO_COPY else op  # the float32 copy of do or do itself (the op's output type)
    out = {"fwd": [], "bwd": [], "grads": level_grads(n, H, d, d, C, J, op, do_b)}
    fwd_lanes = tg._level_lanes(n, J, d, d, "fwd", prec)
    for li, lane in enumerate(fwd_lanes):
        out["fwd"].append([level_fwd(n, H, d, C, op, lane, g == lane.groups[0], g == lane.groups[0] and li == 0, g)
                           for g in lane.groups])
    for lane in tg._level_lanes(n, J, d, d, "bwd", prec):
        out["bwd"].append([level_bwd(n, H, d, C, op, do_b, lane, g) for g in lane.groups])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=1, help="sequences of T tokens (the tree's counts scale with it)")
    ap.add_argument("--config", default="default", help="as level_timing.py's --configs (one)")
    ap.add_argument("--timing", default=None, help="a level_timing.py JSON with a row of this --config")
    ap.add_argument("--chunk", type=int, default=64, help="tokens per chunk (what a larger chunk would save)")
    ap.add_argument("--peak-tb-s", type=float, default=3.0)
    ap.add_argument("--do-in-place", action="store_true", help="LEVEL_DO_COPY = 0 (do read in bf16)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    H, d, C, op, prec = 16, 128, args.chunk, 2, "tf32"
    tg.LEVEL_DO_COPY = 0 if args.do_in_place else tg.LEVEL_DO_COPY
    configure(args.config)
    counted = count(args.T, H * args.batch, d, C, op, prec)
    rows = []
    row = None
    if args.timing:
        with open(args.timing) as f:
            row = next(r for r in json.load(f)["rows"] if r["config"] == args.config)

    def launches(kernel: str, lanes_bytes: list[list[int]], names: list[str]) -> None:
        times = {}
        if row:  # a lane's launches: the stream with as many launches as the lane has groups
            per_stream = [v for k, v in row["kernel_ms_per_launch"].items() if k.startswith(kernel + " ")]
            for lane_i, lane_bytes in enumerate(lanes_bytes):
                match = [v for v in per_stream if len(v) == len(lane_bytes)]
                if len(match) == 1:
                    times[lane_i] = match[0]
        for lane_i, lane_bytes in enumerate(lanes_bytes):
            for g, b in enumerate(lane_bytes):
                r = {"kernel": kernel, "lane": names[lane_i], "group": g, "GB": round(b / 1e9, 3)}
                if lane_i in times:
                    ms = times[lane_i][g]
                    r["ms"] = ms
                    r["TB_s"] = round(b / ms / 1e9, 2)
                    r["of_peak"] = round(b / ms / 1e9 / args.peak_tb_s, 2)
                rows.append(r)

    lanes = ["main", "top"]
    launches("_level_fwd", counted["fwd"], lanes if len(counted["fwd"]) > 1 else ["top"])
    launches("_level_bwd", counted["bwd"], lanes if len(counted["bwd"]) > 1 else ["top"])
    launches("_level_grads", [[counted["grads"]]], ["all"])
    for r in rows:
        print(r)
    total = sum(r["GB"] for r in rows)
    print(f"all level kernels: {total:.1f} GB counted, {total / args.peak_tb_s:.1f} ms at {args.peak_tb_s} TB/s "
          "if nothing came from L2 and nothing overlapped")
    fwd = sum(r["GB"] for r in rows if r["kernel"] == "_level_fwd")
    n = args.T // C
    J, do_b = (n - 1).bit_length(), F32 if tg.LEVEL_DO_COPY else op
    NH = H * args.batch
    tree, tree_nl = (tree_fwd(n, NH, d, d, C, J, op, leaves=lv) / 1e9 for lv in (True, False))
    tree_b, tree_b_nl = (tree_bwd(n, NH, d, d, C, J, op, do_b, leaves=lv) / 1e9 for lv in (True, False))
    build_nl = tree_build(n, d, d, C, J, op, leaves=False) * NH / 1e9
    parts = {"fwd_build_no_leaves": build_nl, "fwd_reads": tree_nl - build_nl}
    parts |= {f"bwd_{k}": v / 1e9 for k, v in tree_bwd_parts(n, NH, d, d, C, J, op, do_b).items()}
    parts = {k: round(v, 2) for k, v in parts.items()}
    print("tree per phase, GB (ms at the peak if nothing came from L2):",
          ", ".join(f"{k} {v} ({v / args.peak_tb_s:.2f})" for k, v in parts.items()))
    print(f"forward: {fwd:.1f} GB counted; the tree's (triton_gdn_tree.tree_reads) {tree:.1f} GB, "
          f"{tree_nl:.1f} without stored leaves (LEVEL_TREE_LEAVES_FWD = 0)")
    print(f"backward: {total - fwd:.1f} GB counted; the tree's (triton_gdn_tree.tree_backward) {tree_b:.1f} GB, "
          f"{tree_b_nl:.1f} without stored leaves (LEVEL_TREE_LEAVES_BWD = 0)")
    if args.json:
        meta = {"T": args.T, "batch": args.batch, "H": H, "d": d, "C": C, "operand_bytes": op, "config": args.config,
                "timing": args.timing, "triton": triton.__version__, "peak_tb_s": args.peak_tb_s}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "total_GB": round(total, 2), "fwd_GB": round(fwd, 2),
                       "tree_fwd_GB": round(tree, 2),
                       "tree_fwd_no_leaves_GB": round(tree_nl, 2), "tree_bwd_GB": round(tree_b, 2),
                       "tree_bwd_no_leaves_GB": round(tree_b_nl, 2), "tree_parts_GB": parts}, f, indent=1)


if __name__ == "__main__":
    main()
