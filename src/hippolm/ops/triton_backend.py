"""Our own Triton kernels behind the dispatch (backend ``"triton"``).

:func:`plan_loglinear` says whether a log-linear call can run on them, or why not (the dispatch
then runs the plain-PyTorch reference). Triton is imported lazily: CPU installs never need it.
On CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``, tests).
"""

from __future__ import annotations

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
    """Two fixes to Triton 3.6's CPU interpreter (interpreter only; compiled kernels are untouched):

    - it turns scalars into 1-element arrays and calls ``int()`` on them for ``range(n)``, which
      numpy >= 2.4 refuses: use the element;
    - ``tl.dot`` multiplies bf16 operands as their raw uint16 storage: widen them to float32 first
      (what the tensor cores do: bf16 products, float32 accumulation).
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


def kernels():
    """The kernel module (imported on first use)."""
    if interpreting():
        _patch_interpreter()
    from . import triton_loglinear

    return triton_loglinear


def plan_loglinear(op: str, q: torch.Tensor, v: torch.Tensor, initial_state, mode: str,
                   explicit: bool = False) -> tuple[bool, str]:
    """(run on our Triton kernels?, reason) for a log-linear op call. ``backend="auto"`` picks them
    on CUDA only; the CPU interpreter runs them only when asked for (``explicit``, tests)."""
    if op != "ssd":
        return False, "no Triton kernel for log-linear Gated DeltaNet yet"
    if mode != "chunk":
        return False, f"mode={mode!r} runs the reference"
    if not explicit and q.device.type != "cuda":
        return False, "inputs are not on a CUDA device"
    if not usable(q.device):
        return False, ("Triton is not installed" if not triton_importable()
                       else f"Triton kernels do not run on {q.device.type} here")
    if q.dtype not in KERNEL_DTYPES:
        return False, f"Triton kernels take fp16/bf16/fp32, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return False, f"Triton kernels take head dims up to {MAX_HEAD_DIM}"
    if initial_state is not None and bool((initial_state.position != 0).any()):
        # Position 0 occupies no slot (what AHN passes to start a sequence): same as no state.
        return False, "the Triton kernels do not take an initial state past position 0 yet"
    return True, "triton"


def _pack(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[1, T, ...] packed sequences -> [N, max_len, ...] dense, zero past each sequence's end."""
    out = x[0][index]
    return out * valid.view(*valid.shape, *([1] * (out.ndim - 2))).to(out.dtype)


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
                if lvl == 0:
                    a, b = last, last + 1
                elif (last >> (lvl - 1)) & 1:
                    half = 1 << (lvl - 1)
                    b = last - last % half
                    a = b - half
                else:
                    levels.append(part[:, :, 0] * 0)
                    continue
                kw = k[idx, a:b].float() * w[:, a:b, :, None]
                levels.append(torch.einsum("nshk,nshv->nhkv", kw, v[idx, a:b].float()))
            part = torch.stack(levels, 2)
        parts.append(part)
        order += rows
    slots = torch.cat(parts)
    return slots[torch.tensor(order, device=k.device).argsort()] if order != sorted(order) else slots


def run_loglinear_ssd(q, k, v, g, lam, scale: float, output_final_state: bool, cu_seqlens, chunk_size: int):
    """Log-linear Mamba-2 on the Triton kernels, sequences starting at position 0.

    Returns (o, final slots [N, H, L, K, V] or None, lengths [N])."""
    C = chunk_size if chunk_size in (16, 32, 64) else 64
    B, T = q.shape[:2]
    if cu_seqlens is None:
        lengths = [T] * B
        o = kernels().loglinear_ssd(q, k, v, g, lam, scale, C)
        dense = (k, v, g)
    else:
        offsets = cu_seqlens.tolist()
        lengths = [e - s for s, e in itertools.pairwise(offsets)]
        width = max(max(lengths), 1)
        starts = torch.tensor(offsets[:-1], device=q.device)
        pos = torch.arange(width, device=q.device)
        valid = pos[None] < torch.tensor(lengths, device=q.device)[:, None]  # [N, width]
        index = torch.where(valid, starts[:, None] + pos[None], 0)
        qd, kd, vd, gd, lamd = (_pack(x, index, valid) for x in (q, k, v, g, lam))
        od = kernels().loglinear_ssd(qd, kd, vd, gd, lamd, scale, C)
        o = od[valid][None]
        dense = (kd, vd, gd)
    slots = _final_slots(*dense, lengths, lam.shape[-1]) if output_final_state else None
    return o, slots, lengths


def plan_linear_ssd(q: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor], initial_state, mode: str,
                    backend: str) -> tuple[bool, str]:
    """(run linear SSD / Mamba-2 on our kernels?, reason). ``"auto"`` picks them only with gradients on
    CUDA where FLA has no correct chunk backward (Hopper with Triton 3.4-3.7.0, or FLA missing),
    since FLA's chunk kernel is the faster one where it works."""
    explicit = backend == "triton"
    if mode != "chunk" and not explicit:
        return False, "mode='recurrent'"
    if not explicit:
        if not q.is_cuda or q.dtype == torch.float32:  # float32: FLA's full-precision recurrent kernel
            return False, "not a 16-bit CUDA call"
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return False, "no gradients: FLA's chunk forward is right"
        from . import fla_backend

        if fla_backend.fla_available() and not fla_backend.gated_chunk_backward_broken(q.device.index or 0):
            return False, "FLA's chunk backward is right here"
    if not usable(q.device):
        return False, "Triton kernels do not run here"
    if q.dtype not in KERNEL_DTYPES:
        return False, f"Triton kernels take fp16/bf16/fp32, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return False, f"Triton kernels take head dims up to {MAX_HEAD_DIM}"
    return True, "triton"


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
    """(run (Gated) DeltaNet on our chunk form with the Triton state scan?, reason). ``"auto"``: only
    Gated DeltaNet with gradients on CUDA where FLA has no correct kernel with a backward (Hopper with
    Triton 3.4-3.7.0, float32, or FLA missing); FLA stays where it is right (faster, fused)."""
    if backend != "triton":
        if op != "gated_delta_rule" or not q.is_cuda:
            return False, "FLA or the reference is right here"
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return False, "no gradients: FLA's kernels are right"
        from . import fla_backend

        fla_ok = (fla_backend.fla_available() and q.dtype != torch.float32
                  and not fla_backend.gated_chunk_backward_broken(q.device.index or 0))
        if fla_ok:
            return False, "FLA's chunk backward is right here"
    if not usable(q.device):
        return False, "Triton kernels do not run here"
    if q.dtype not in KERNEL_DTYPES:
        return False, f"Triton kernels take fp16/bf16/fp32, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return False, f"Triton kernels take head dims up to {MAX_HEAD_DIM}"
    return True, "triton"


def run_delta(q, k, v, g, beta, scale: float, initial_state, output_final_state: bool, cu_seqlens,
              chunk_size: int):
    """(Gated) DeltaNet: chunk-parallel WY parts in torch, the inter-chunk state scan in Triton."""
    if interpreting():
        _patch_interpreter()
    from . import triton_gdn

    return triton_gdn.gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                       chunk_size)
