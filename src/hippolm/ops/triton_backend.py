"""Our own Triton kernels behind the dispatch (backend ``"triton"``).

:func:`plan_loglinear` says whether a log-linear call can run on them, or why not (the dispatch
then runs the plain-PyTorch reference). Triton is imported lazily: CPU installs never need it.
On CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``, tests).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import os

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def usable(device: torch.device) -> bool:
    """Whether our kernels can run on tensors of ``device`` (CUDA, or CPU under the interpreter)."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and interpreting()


@functools.cache
def _patch_interpreter() -> None:
    """Fixes to Triton 3.6's CPU interpreter (interpreter only; compiled kernels are untouched):

    - it turns scalars into 1-element arrays and calls ``int()`` on them for ``range(n)``, which
      numpy >= 2.4 refuses: use the element;
    - ``tl.dot`` multiplies bf16 operands as their raw uint16 storage: widen them to float32 first
      (what the tensor cores do: bf16 products, float32 accumulation);
    - float32 -> bf16 casts (``.to``, stores) truncate the mantissa, twice the error of the GPU's
      round-to-nearest-even: round as torch does, so CPU-measured bf16 errors are the GPU's.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched

    builder = interpreter.InterpreterBuilder
    dot = builder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot

    convert = interpreter._convert_float

    def convert_float(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and "RTZ" not in str(rounding_mode):
            rounded = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16)
            return rounded.view(torch.int16).numpy().view(np.uint16)
        return convert(data, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert_float


def kernels():
    """The kernel module (imported on first use)."""
    if interpreting():
        _patch_interpreter()
    from . import triton_loglinear

    return triton_loglinear


def _kernels_take(q: torch.Tensor, v: torch.Tensor) -> tuple[bool, str]:
    """(can our Triton kernels run these inputs here?, reason): device, dtype and head-dim limits."""
    if not usable(q.device):
        return False, ("Triton is not installed" if not triton_importable()
                       else f"Triton kernels do not run on {q.device.type} here")
    if q.dtype not in KERNEL_DTYPES:
        return False, f"Triton kernels take fp16/bf16/fp32, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return False, f"Triton kernels take head dims up to {MAX_HEAD_DIM}"
    return True, "triton"


def plan_loglinear(op: str, q: torch.Tensor, v: torch.Tensor, initial_state, mode: str,
                   explicit: bool = False) -> tuple[bool, str]:
    """(run on our Triton kernels?, reason) for a log-linear op call. ``backend="auto"`` picks them
    on CUDA only; the CPU interpreter runs them only when asked for (``explicit``, tests)."""
    if mode != "chunk":
        return False, f"mode={mode!r} runs the reference"
    if not explicit and q.device.type != "cuda":
        return False, "inputs are not on a CUDA device"
    return _kernels_take(q, v)


def _level_block(last: int, lvl: int) -> tuple[int, int]:
    """[a, b): positions of the keys in query ``last``'s level-``lvl`` Fenwick block; (0, 0) when
    that level is empty."""
    from .loglinear import _slot_occupied, block_start

    if not _slot_occupied(last, lvl):
        return 0, 0
    a = block_start(last, lvl)
    return a, a + (1 if lvl == 0 else 1 << (lvl - 1))


def _final_slots(k, v, g, lengths: list[int], L: int) -> torch.Tensor:
    """Level slots after the last token of each dense sequence (positions 0..len-1), in plain
    (differentiable) torch: slot l holds the keys of the last query's level-l Fenwick block."""
    H, K, V = k.shape[2], k.shape[3], v.shape[-1]
    per_length: dict[int, list[int]] = {}
    for n, length in enumerate(lengths):
        per_length.setdefault(length, []).append(n)
    parts, order = [], []
    for length, rows in per_length.items():  # sequences of one length share their level blocks
        idx = torch.tensor(rows, device=k.device)
        part = k.new_zeros(len(rows), H, L, K, V, dtype=torch.float32)
        if length > 0:
            last = length - 1
            gc = g[idx, :length].double().cumsum(1)  # [n, len, H]
            w = (gc[:, last:] - gc).exp().float()  # decay from each key to the last query
            levels = []
            for lvl in range(L):
                a, b = _level_block(last, lvl)  # an empty level sums nothing: zeros
                kw = k[idx, a:b].float() * w[:, a:b, :, None]
                levels.append(torch.einsum("nshk,nshv->nhkv", kw, v[idx, a:b].float()))
            part = torch.stack(levels, 2)
        parts.append(part)
        order += rows
    slots = torch.cat(parts)
    return slots[torch.tensor(order, device=k.device).argsort()] if order != sorted(order) else slots


def _run_from_positions(q, k, v, g, lam, scale, output_final_state, cu_seqlens, C, state):
    """Log-linear Mamba-2 of sequences continuing from ``state`` (a LogLinearState at positions
    p_n > 0): the new tokens on the kernels in the virtual layout (:func:`_virtual_layout`); the old
    slots' reads and the final-state routing in plain (differentiable) torch, as in the reference.
    """
    from .loglinear import _slot_occupied, _virtual_layout, bit_length, block_start

    H, L = q.shape[2], lam.shape[-1]
    starts = state.position.tolist()
    lay = _virtual_layout(q, cu_seqlens, C, L, starts)
    bounds = lay.bounds
    qd, kd, vd, gd, lamd = (lay.pack(x) for x in (q, k, v, g, lam))
    od = kernels().loglinear_ssd(qd, kd, vd, gd, lay.levels(lamd), scale, C)
    o_new = od[lay.valid]  # [total, H, V] in sequence order
    # Old slots: slot l is the block of the last old query at level l; for a new query t its keys all
    # sit at level bit_length(t ^ block start), decayed by the new tokens' cumulative decay.

    outs, finals = [], []
    for n, ((b, s, e), p) in enumerate(zip(bounds, starts, strict=True)):
        length = e - s
        last_old = torch.tensor([p - 1], device=q.device)
        pos = p + torch.arange(length, device=q.device)
        gc = g[b, s:e].double().cumsum(0).float()  # [len, H]
        o_n = o_new[sum(be - bs for _, bs, be in bounds[:n]) :][:length].float()
        slots_old = state.slots[n].float()  # [H, L, K, V]
        for lvl in range(L):
            if not bool(_slot_occupied(last_old, lvl)):
                continue
            start_l = int(block_start(last_old, lvl))
            level_t = bit_length(pos ^ start_l)  # [len]
            coef = lam[b, s:e].float().gather(-1, level_t[:, None, None].expand(length, H, 1))[..., 0] * gc.exp()
            o_n = o_n + scale * coef[..., None] * torch.einsum("thk,hkv->thv", q[b, s:e].float(), slots_old[:, lvl])
        outs.append(o_n.to(q.dtype))
        if output_final_state:
            finals.append(_final_slots_from(k[b, s:e], v[b, s:e], g[b, s:e], p, slots_old, L))
    o = torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]
    slots = torch.stack(finals) if output_final_state else None
    return o, slots, [e - s for _, s, e in bounds], [p + e - s for (_, s, e), p in zip(bounds, starts, strict=True)]


def _final_slots_from(k, v, g, p: int, slots_old, L: int) -> torch.Tensor:
    """Final slots of one sequence of new tokens k, v, g [len, H, *] at positions p.. after old slots."""
    from .loglinear import _slot_occupied, bit_length, block_start

    length = k.shape[0]
    if length == 0:  # only the routing below (which keeps occupied slots only, as the reference)
        k, v, g = k.new_zeros(1, *k.shape[1:]), v.new_zeros(1, *v.shape[1:]), g.new_zeros(1, *g.shape[1:])
    last = p + length - 1
    gc = g.double().cumsum(0)
    w = (gc[-1] - gc).exp().float()  # [len, H]
    out = []
    for lvl in range(L):
        a, b = _level_block(last, lvl)
        a, b = max(a, p) - p, min(max(b, p) - p, length)  # the new tokens' part of the block
        kw = k[a:b].float() * w[a:b, :, None]
        out.append(torch.einsum("shk,shv->hkv", kw, v[a:b].float()))
    new = torch.stack(out, 1)  # [H, L, K, V]
    # Old slots: each moves whole to its level seen from the new last query, decayed by all new tokens.
    last_old = torch.tensor([p - 1], device=k.device)
    decay = gc[-1].exp().float()[:, None, None]
    for lvl in range(L):
        if bool(_slot_occupied(last_old, lvl)):
            to = min(int(bit_length(torch.tensor([last ^ int(block_start(last_old, lvl))]))), L - 1)
            new = new.index_add(1, torch.tensor([to], device=k.device), (slots_old[:, lvl] * decay)[:, None])
    return new


def _kernel_entry(fn):
    """Run ``fn`` (torch parts + our Triton launches) with autocast off, on q's GPU, outside
    torch.compile graphs. Autocast: the torch parts (WY transform, decays, level sums) are float32 by
    design, and under autocast their matmuls would come out bf16 and meet float32 states inside the
    kernels (``tl.dot`` refuses mixed operands); inputs keep their dtypes, outputs match them. Device:
    Triton launches on the current device, whatever the tensors' (autograd sets it for the backward).
    Graphs: the launches and the log-linear GDN side stream stay out, as FLA's entry points do."""

    @torch.compiler.disable
    @functools.wraps(fn)
    def run(q, *args, **kwargs):
        device = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
        with device, torch.autocast(q.device.type, enabled=False):
            return fn(q, *args, **kwargs)

    return run


@_kernel_entry
def run_loglinear_ssd(q, k, v, g, lam, scale: float, output_final_state: bool, cu_seqlens, chunk_size: int,
                      initial_state=None):
    """Log-linear Mamba-2 on the Triton kernels.

    Returns (o, final slots [N, H, L, K, V] or None, final positions [N])."""
    C = chunk_size if chunk_size in (16, 32, 64) else 64
    B, T = q.shape[:2]
    if initial_state is not None and bool((initial_state.position != 0).any()):  # one layout: its torch
        # parts cost more per piece than _continue's pieces save (H100, 16k tokens: 19.4 vs 39.5 ms)
        o, slots, _, ends = _run_from_positions(q, k, v, g, lam, scale, output_final_state, cu_seqlens, C,
                                                initial_state)
        return o, slots, ends
    if cu_seqlens is None:
        lengths = [T] * B
        o = kernels().loglinear_ssd(q, k, v, g, lam, scale, C)
        dense = (k, v, g)
    else:
        from .loglinear import _virtual_layout

        lengths = cu_seqlens.diff().tolist()
        lay = _virtual_layout(q, cu_seqlens, C, lam.shape[-1], [0] * len(lengths))  # every start 0: dense
        qd, kd, vd, gd, lamd = (lay.pack(x) for x in (q, k, v, g, lam))
        od = kernels().loglinear_ssd(qd, kd, vd, gd, lamd, scale, C)
        o = od[lay.valid][None]
        dense = (kd, vd, gd)
    slots = _final_slots(*dense, lengths, lam.shape[-1]) if output_final_state else None
    return o, slots, lengths


def plan_linear_ssd(q: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor], initial_state, mode: str,
                    backend: str) -> tuple[bool, str]:
    """(run linear SSD / Mamba-2 on our kernels?, reason). Asked by ``"auto"`` only where FLA does not
    take the call (the dispatch asks FLA first): then for 16-bit training on CUDA."""
    explicit = backend == "triton"
    if mode != "chunk" and not explicit:
        return False, "mode='recurrent'"
    if not explicit:
        if not q.is_cuda or q.dtype == torch.float32:  # float32: FLA's full-precision recurrent kernel
            return False, "not a 16-bit CUDA call"
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return False, "no gradients: the reference is right"
    return _kernels_take(q, v)


@_kernel_entry
def run_linear_ssd(q, k, v, g, scale: float, output_final_state: bool, cu_seqlens, chunk_size: int,
                   initial_state=None):
    """Linear SSD as log-linear SSD with every level weighted 1 (exact: the collapse identity);
    the final state is the sum of the level slots. An initial state S0 adds
    ``scale exp(Gc_t) q_t^T S0`` to the outputs and ``exp(Gc_last) S0`` to the final state
    (Gc: cumulative log decay of the sequence), in differentiable torch.
    Returns (o, final state [N, H, K, V] or None)."""
    B, T, H = q.shape[:3]
    longest = T if cu_seqlens is None else int(cu_seqlens.diff().max())
    lam = torch.ones(B, T, H, (max(longest, 1) - 1).bit_length() + 1, device=q.device, dtype=torch.float32)
    o, slots, _ = run_loglinear_ssd(q, k, v, g, lam, scale, output_final_state, cu_seqlens, chunk_size)
    final = None if slots is None else slots.sum(2)
    if initial_state is None:
        return o, final
    bounds = ([(b, 0, T) for b in range(B)] if cu_seqlens is None
              else [(0, s, e) for s, e in itertools.pairwise(cu_seqlens.tolist())])
    parts, ends = [], []
    for n, (b, s, e) in enumerate(bounds):
        s0 = initial_state[n].float()  # [H, K, V]
        gc = g[b, s:e].double().cumsum(0).float()  # [len, H]
        parts.append(torch.einsum("thk,hkv->thv", q[b, s:e].float() * gc.exp()[..., None], s0) * scale)
        ends.append(s0 * (gc[-1].exp()[:, None, None] if e > s else 1.0))
    extra = torch.stack(parts) if cu_seqlens is None else torch.cat(parts)[None]
    o = (o.float() + extra).to(o.dtype)
    return o, (None if final is None else final + torch.stack(ends))


def plan_delta(op: str, q: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor],
               backend: str) -> tuple[bool, str]:
    """(run (Gated) DeltaNet on our chunk form with the Triton state scan?, reason). Asked by
    ``"auto"`` only where FLA does not take the call (the dispatch asks FLA first: float32 Gated
    DeltaNet training, FLA missing, ...): then for Gated DeltaNet with gradients on CUDA."""
    if backend != "triton":
        if op != "gated_delta_rule" or not q.is_cuda:
            return False, "FLA or the reference is right here"
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return False, "no gradients: the reference is right"
    return _kernels_take(q, v)


@_kernel_entry
def run_delta(q, k, v, g, beta, scale: float, initial_state, output_final_state: bool, cu_seqlens,
              chunk_size: int):
    """(Gated) DeltaNet: chunk-parallel WY parts in torch, the inter-chunk state scan in Triton."""
    if interpreting():
        _patch_interpreter()
    from . import triton_gdn

    return triton_gdn.gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                       chunk_size)


@_kernel_entry
def run_loglinear_delta(q, k, v, g, beta, lam, scale: float, output_final_state: bool, cu_seqlens,
                        chunk_size: int, initial_state=None):
    """Log-linear Gated DeltaNet: the fused chunk kernels + the tree of block summaries (Triton).

    Returns (o, final slots [N, H, L, K, V] or None, final positions [N])."""
    if interpreting():
        _patch_interpreter()
    from . import triton_gdn

    if initial_state is None or not bool((initial_state.position != 0).any()):
        o, slots, lengths = triton_gdn.loglinear_gated_delta_rule(q, k, v, g, beta, lam, scale, output_final_state,
                                                                  cu_seqlens, chunk_size)
        return o, slots, lengths
    C = chunk_size if chunk_size in (16, 32, 64) else 64
    return _continue(lambda xs, cu, state, final: _run_delta_from_positions(*xs, scale, final, cu, C, state),
                     [q, k, v, g, beta, lam], output_final_state, cu_seqlens, C, initial_state)


def _aligned_cuts(p: int, T: int, C: int) -> list[int]:
    """Cut points of T new tokens from position p (chunk F, n chunks spanned, 2^m >= n) into at most two
    pieces whose virtual layouts need few chunks of padding: a call's layout takes F mod 2^m of them
    (up to as many as the new tokens). Cut at E, the next multiple of 2^m after F: the piece from E
    needs none, the piece before it (n1 = E - F chunks) 2^m1 - n1 < n1 (F = E - n1, E a multiple of
    its own 2^m1 >= n1)."""
    first, off = divmod(p, C)
    n = max(1, -(-(off + T) // C))
    span = 1 << (n - 1).bit_length()
    if first % span == 0:
        return [0, T]
    cut = (first // span + 1) * span * C - p
    return [0, T] if cut >= T else [0, cut, T]


def _continue(run, xs, output_final_state: bool, cu_seqlens, C: int, state):
    """Log-linear Gated DeltaNet continuing from ``state`` (positions > 0), ``run(xs, cu_seqlens, state,
    final) -> (o, slots, ends)`` on the virtual layout. Sequences that all continue from one position
    run in up to two pieces (:func:`_aligned_cuts`), the second from the first one's state (H100, 16k
    tokens from position 57347: 23.5 ms vs 30.6 in one layout; continuation_timing_h100*.json)."""
    from .loglinear import LogLinearState

    T = xs[0].shape[1]
    starts = state.position.unique()
    one_start = starts.numel() == 1 and (cu_seqlens is None or cu_seqlens.numel() == 2)
    cuts = _aligned_cuts(int(starts[0]), T, C) if one_start else [0, T]
    outs = []
    for a, b in itertools.pairwise(cuts):
        final = output_final_state or b < T
        cu = None if cu_seqlens is None else torch.tensor([0, b - a], device=cu_seqlens.device)
        o, slots, ends = run([x[:, a:b] for x in xs], cu if len(cuts) > 2 else cu_seqlens, state, final)
        outs.append(o)
        if b < T:
            state = LogLinearState(slots, torch.tensor(ends, dtype=torch.long, device=slots.device))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), slots, ends


def _run_delta_from_positions(q, k, v, g, beta, lam, scale, output_final_state, cu_seqlens, C, state):
    """Log-linear Gated DeltaNet of sequences continuing from ``state`` (positions p_n >= 0): the new
    tokens in the virtual layout (:func:`_virtual_layout`); every old slot is one aligned block, whose
    keys sit at level bit_length(t ^ block start) for each new query t: its read weights per position,
    and the level it takes in the final slots, go to the kernels' path as a ``triton_gdn.Carry``."""
    from . import triton_gdn
    from .loglinear import _slot_occupied, _virtual_layout, bit_length, block_start

    B, T, H = q.shape[:3]
    L = lam.shape[-1]
    positions = state.position.tolist()
    lay = _virtual_layout(q, cu_seqlens, C, L, positions)
    N, width = lay.valid.shape
    qd, kd, vd, gd, bd, lam_real = (lay.pack(x) for x in (q, k, v, g, beta, lam))
    lamd = lay.levels(lam_real)
    # The old blocks, on the host (positions are known there): no device sync per level.
    old = [lv for lv in range(L) if any(_slot_occupied(p - 1, lv) for p in positions)]
    starts = torch.tensor([[max(block_start(p - 1, lv), 0) for lv in old] for p in positions], device=q.device)
    occupied = torch.tensor([[bool(_slot_occupied(p - 1, lv)) for lv in old] for p in positions], device=q.device)
    last = torch.tensor(positions, device=q.device) - 1 + lay.valid.sum(1)  # each sequence's last query
    pos = torch.where(lay.valid, lay.real_pos, 0)
    read_level = bit_length(pos[..., None] ^ starts[:, None]).clamp_max(L - 1)  # [N, width, G]
    coef = lam_real.gather(-1, read_level[:, :, None].expand(N, width, H, len(old)))
    coef = coef * occupied[:, None, None].to(coef.dtype)  # lam_real is 0 at the padding
    key_level = torch.where(lay.valid, bit_length(last[:, None] ^ pos), -1)
    route = torch.nn.functional.one_hot(bit_length(last[:, None] ^ starts).clamp_max(L - 1), L)
    route = route * occupied[..., None]
    slots = state.slots[:, :, old] * occupied[:, None, :, None, None].to(state.slots.dtype)
    carry = triton_gdn.Carry(slots, coef, key_level, route)
    od, final, _ = triton_gdn.loglinear_gated_delta_rule(qd, kd, vd, gd, bd, lamd, scale, output_final_state, None,
                                                         C, carry)
    o = od[lay.valid]  # [total, H, V] in sequence order
    o = o[None] if cu_seqlens is not None else o.reshape(B, T, *o.shape[1:])
    return o, final, (last + 1).tolist()
