"""The backward a kernel for the tree-of-summaries reads (hippolm.ops.loglinear._tree_reads) would
run, written out by hand in four parallel phases and checked against autograd of the reference:

1. per chunk: carry the query through the blocks it reads (q_0 = qw_i, q_k = q_{k-1} T_k), then in
   reverse with g = lam_k do_i: dlam_k = rowsum(do_i * (q_{k-1} D_k)), the pair (q_{k-1},
   [dq_k | g]) for the node read, dq_{k-1} = g D_k^T + dq_k T_k^T; dqw_i = dq_0;
2. per node: dM = [dT | dD] = sum over its readers' pairs of q^T [dq | g];
3. per height, top down: a parent M = T_R M_L + [0 | D_R] gives dM_L += T_R^T dM,
   dT_R += dM M_L^T, dD_R += dM's D columns;
4. per chunk (the leaves, M = [ge I - kd^T w | kd^T u]): dge = trace(dT), dw = -kd dT,
   dkd = -w dT^T + u dD^T, du = kd dD.
"""

from __future__ import annotations

import torch
from conftest import rel_err

from hippolm.ops import reference
from hippolm.ops.loglinear import _tree_reads, _tree_summaries


def _factors(qw, kd, w, ge) -> reference.ChunkFactors:
    """Chunk factors with the delta rule, as _tree_reads and _tree_summaries take them."""
    return reference.ChunkFactors(attn=None, q_eff=qw, k_end=kd, gamma_end=ge, mix=None, w=w)


def _tree_backward(qw, kd, w, u, ge, lam, do):
    """Gradients of sum(do * reads) for the reads of _tree_reads (lam [N, H, n, C, J] per chunk level)."""
    n, K, J = qw.shape[2], qw.shape[-1], lam.shape[-1]
    Ms = [torch.cat(td, -1) for td in zip(*_tree_summaries(_factors(qw, kd, w, ge), u), strict=True)]  # [T | D]
    dMs = [torch.zeros_like(M) for M in Ms]
    dqw, dlam = torch.zeros_like(qw), torch.zeros_like(lam)
    for i in range(n):  # phase 1 (every chunk in parallel in a kernel) and phase 2 (the sums)
        bits = [j for j in range(J) if (i >> j) & 1]
        nodes = [(j, (i >> j) - 1) for j in bits]
        qs = [qw[:, :, i]]
        for j, m in nodes[:-1]:
            qs.append(qs[-1] @ Ms[j][:, :, m, :, :K])
        dq = torch.zeros_like(qs[0])
        for k in reversed(range(len(nodes))):
            j, m = nodes[k]
            T, D = Ms[j][:, :, m, :, :K], Ms[j][:, :, m, :, K:]
            g = lam[:, :, i, :, j, None] * do[:, :, i]
            dlam[:, :, i, :, j] = (do[:, :, i] * (qs[k] @ D)).sum(-1)
            dMs[j][:, :, m] += qs[k].transpose(-1, -2) @ torch.cat([dq, g], -1)
            dq = g @ D.transpose(-1, -2) + dq @ T.transpose(-1, -2)
        dqw[:, :, i] = dq
    for h in reversed(range(1, len(Ms))):  # phase 3: the merges, top down
        dM, below = dMs[h], Ms[h - 1]
        m = dM.shape[2]
        left, right = below[:, :, 0 : 2 * m : 2], below[:, :, 1 : 2 * m : 2]
        dMs[h - 1][:, :, 0 : 2 * m : 2] += right[..., :K].transpose(-1, -2) @ dM
        dMs[h - 1][:, :, 1 : 2 * m : 2, :, :K] += dM @ left.transpose(-1, -2)
        dMs[h - 1][:, :, 1 : 2 * m : 2, :, K:] += dM[..., K:]
    dT, dD = dMs[0][..., :K], dMs[0][..., K:]  # phase 4: the leaves
    dge = torch.diagonal(dT, dim1=-2, dim2=-1).sum(-1)
    dw = -kd @ dT
    dkd = -w @ dT.transpose(-1, -2) + u @ dD.transpose(-1, -2)
    du = kd @ dD
    return dqw, dkd, dw, du, dge, dlam


def test_tree_backward_by_hand_equals_autograd():
    """Random factors (13 chunks: odd nodes with no parent, chunk levels 0..3) in float64: the four
    phases give every gradient autograd gives through the reference's tree reads."""
    gen = torch.Generator().manual_seed(0)
    N, H, n, C, K, V, J = 2, 2, 13, 4, 5, 3, 4

    def r(*s, scale=0.3):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).requires_grad_()

    qw, kd, w, u = r(N, H, n, C, K), r(N, H, n, C, K), r(N, H, n, C, K), r(N, H, n, C, V)
    ge = (torch.rand(N, H, n, generator=gen, dtype=torch.float64) * 0.5 + 0.5).requires_grad_()
    lam = (torch.rand(N, H, n, C, J, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    do = torch.randn(N, H, n, C, V, generator=gen, dtype=torch.float64)
    # _tree_reads takes chunk level j's weight from column c_bits + 1 + j
    reads = _tree_reads(_factors(qw, kd, w, ge), u, torch.cat([lam.new_zeros(N, H, n, C, 1), lam], -1), c_bits=0)
    expected = torch.autograd.grad((reads * do).sum(), (qw, kd, w, u, ge, lam))
    got = _tree_backward(qw.detach(), kd.detach(), w.detach(), u.detach(), ge.detach(), lam.detach(), do)
    for name, a, b in zip(("dqw", "dkd", "dw", "du", "dge", "dlam"), got, expected, strict=True):
        assert rel_err(a, b) < 1e-12, name
