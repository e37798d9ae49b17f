"""Bytes that log-linear Gated DeltaNet's chunk levels move through the tree of block summaries
(hippolm.ops.triton_gdn_tree), per phase, counted from what each kernel loads and stores (no GPU
needed): the tree built, the forward's reads, and the backward's rebuild, pairs, node gradients and
leaf gradients, with and without stored leaves. What the kernels would move if the L2 cache served
nothing beyond the re-reads noted per function; divided by a peak bandwidth, a floor on their time.
(Before 2026-12-08 it also counted the level-scan kernels, removed then; their counts are in
level_bytes_h100_fwd_tiles.json.)

    python benchmarks/level_bytes.py --T 8192 --batch 8 --json benchmarks/results/level_bytes_tree_T8192_B8_C64.json
"""

from __future__ import annotations

import argparse
import json

import triton

F32 = 4

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=1, help="sequences of T tokens (the counts scale with it)")
    ap.add_argument("--chunk", type=int, default=64, help="tokens per chunk (what a larger chunk would save)")
    ap.add_argument("--peak-tb-s", type=float, default=3.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    H, d, C, op = 16, 128, args.chunk, 2  # bf16 operands; do read in place in the output's type (op bytes)
    n = args.T // C
    J, NH = (n - 1).bit_length(), H * args.batch
    tree, tree_nl = (tree_fwd(n, NH, d, d, C, J, op, leaves=lv) / 1e9 for lv in (True, False))
    tree_b, tree_b_nl = (tree_bwd(n, NH, d, d, C, J, op, op, leaves=lv) / 1e9 for lv in (True, False))
    build_nl = tree_build(n, d, d, C, J, op, leaves=False) * NH / 1e9
    parts = {"fwd_build_no_leaves": build_nl, "fwd_reads": tree_nl - build_nl}
    parts |= {f"bwd_{k}": v / 1e9 for k, v in tree_bwd_parts(n, NH, d, d, C, J, op, op).items()}
    parts = {k: round(v, 2) for k, v in parts.items()}
    print("tree per phase, GB (ms at the peak if nothing came from L2):",
          ", ".join(f"{k} {v} ({v / args.peak_tb_s:.2f})" for k, v in parts.items()))
    print(f"forward {tree:.1f} GB, {tree_nl:.1f} without stored leaves (LEVEL_TREE_LEAVES_FWD = 0); "
          f"backward {tree_b:.1f} GB, {tree_b_nl:.1f} without stored leaves (LEVEL_TREE_LEAVES_BWD = 0)")
    if args.json:
        meta = {"T": args.T, "batch": args.batch, "H": H, "d": d, "C": C, "operand_bytes": op,
                "triton": triton.__version__, "peak_tb_s": args.peak_tb_s}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "tree_fwd_GB": round(tree, 2), "tree_fwd_no_leaves_GB": round(tree_nl, 2),
                       "tree_bwd_GB": round(tree_b, 2), "tree_bwd_no_leaves_GB": round(tree_b_nl, 2),
                       "tree_parts_GB": parts}, f, indent=1)


if __name__ == "__main__":
    main()
