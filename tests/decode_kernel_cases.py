"""Decode kernels (hippolm.ops.decode) against their float64 references; shared by the CUDA test
and the Triton-interpreter test. Run directly: ``python tests/decode_kernel_cases.py [cuda|cpu]``."""

from __future__ import annotations

import math
import sys

import torch

from hippolm.ops import decode as dc


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error; inf where it is not finite (a NaN must fail every `rel(...) > tol` check)."""
    err = float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())
    return err if math.isfinite(err) else math.inf


def split_cases(fn, args: tuple, ref: torch.Tensor, dtype: torch.dtype, label: str) -> list[str]:
    """``fn(*args)`` (an attention kernel) against ``ref`` at the default split rule and at 3 splits
    (uneven; some hold no visible key): the failures."""
    failures = []
    try:
        for splits in (0, 3):
            dc.ATTENTION_SPLITS = splits
            got = fn(*args)
            tol = 1e-3 if dtype == torch.float32 else 2e-2
            if got.dtype != dtype or rel(got, ref) > tol:
                failures.append(f"{label} {dtype} splits {splits}: {rel(got, ref):.2e}")
    finally:
        dc.ATTENTION_SPLITS = 0
    return failures


def attention_cases(device: str, dtypes=(torch.float32,)) -> list[str]:
    failures = []
    for B, H, Hkv, S, D in [(2, 8, 2, 300, 64), (1, 4, 4, 65, 128), (3, 16, 2, 1000, 128), (2, 6, 1, 64, 32)]:
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(S)
            q, k, v = (torch.randn(*shape, generator=gen) for shape in ((B, H, D), (B, Hkv, S, D), (B, Hkv, S, D)))
            # Masks: none; random; only a prefix visible (whole splits see nothing).
            prefix = torch.arange(S)[None].expand(B, S) < torch.randint(1, S + 1, (B, 1), generator=gen)
            for mask in (None, torch.rand(B, S, generator=gen) < 0.3, prefix):
                if mask is not None:
                    mask[:, 0] = True
                add = None if mask is None else torch.randn(B, H, D, generator=gen)
                ref = dc.decode_attention_reference(q.double(), k.double(), v.double(), D**-0.5, mask,
                                                    None if add is None else add.double())
                args = (*(x.to(device, dtype) for x in (q, k, v)), D**-0.5, None if mask is None else mask.to(device),
                        None if add is None else add.to(device))
                failures += split_cases(dc._decode_attention_triton, args, ref, dtype,
                                        f"attention B{B} H{H} Hkv{Hkv} S{S} D{D} mask {mask is not None}")
    return failures


def cache_attention_cases(device: str, dtypes=(torch.float32,)) -> list[str]:
    """Attention over an AHN cache's filled slots (positions decide visibility) against the masked
    reference: windows filling (whole splits past the cursor) and full, padding rows, sink copies in
    the ring, a padding query; cursor-filled slots past the window."""
    failures = []
    for B, H, Hkv, S, W, D, cursor in [(3, 8, 2, 4, 1000, 64, [3, 40, 999]), (2, 4, 4, 0, 300, 128, [300, 7]),
                                       (2, 6, 1, 2, 64, 32, [70, 5])]:
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(W + S)
            n = S + W
            q = torch.randn(B, H, D, generator=gen)
            k, v = torch.randn(B, Hkv, n, D, generator=gen), torch.randn(B, Hkv, n, D, generator=gen)
            cur = torch.tensor(cursor)
            # positions: each row's stream of padding then real tokens, in ring order; garbage past the cursor
            slot_pos = torch.randint(-1, 3 * n, (B, n), generator=gen, dtype=torch.int32)
            slot_pos[:, :S] = torch.where(torch.rand(B, S, generator=gen) < 0.8, torch.arange(S, dtype=torch.int32), -1)
            ring = slot_pos[:, S:]
            ring[torch.rand(B, W, generator=gen) < 0.2] = -1  # padding
            ring[:, :3] = torch.randint(0, max(S, 1), (B, 3), generator=gen, dtype=torch.int32)  # sink copies
            last = S + (cur - 1) % W  # the new token: real, at the cursor's slot
            slot_pos[torch.arange(B), last] = S + 5
            for qpos in (None, torch.tensor([-1] + [3] * (B - 1))):
                add = torch.randn(B, H, D, generator=gen)
                mask = dc.cache_visible(slot_pos, cur, qpos, S, W)
                ref = dc.decode_attention_reference(q.double(), k.double(), v.double(), D**-0.5, mask, add.double())
                args = (*(x.to(device, dtype) for x in (q, k, v)), slot_pos.to(device), cur.to(device), S, W,
                        D**-0.5, None if qpos is None else qpos.to(device), add.to(device, dtype))
                failures += split_cases(dc.cache_attention, args, ref, dtype,
                                        f"cache attention B{B} S{S} W{W} D{D} qpos {qpos is not None}")
    return failures


def memory_cases(device: str) -> list[str]:
    failures = []
    for name, delta, has_g, has_beta in [("gdn", True, True, True), ("deltanet", True, False, True),
                                         ("mamba2", False, True, True), ("no write strength", True, True, False)]:
        for B, H, Hkv, D in [(2, 8, 2, 64), (3, 16, 2, 128)]:
            gen = torch.Generator().manual_seed(D + H)
            q, k, v = torch.randn(B, H, D, generator=gen), torch.randn(B, Hkv, D, generator=gen), torch.randn(
                B, Hkv, D, generator=gen)
            g = -torch.rand(B, H, generator=gen) if has_g else None
            beta, gate = torch.rand(B, H, generator=gen), torch.randn(B, H, generator=gen)
            beta = beta if has_beta else None  # a plain write of strength 1
            state, nw = torch.randn(B, H, D, D, generator=gen) * 0.1, torch.rand(D, generator=gen) + 0.5
            d64 = lambda x: None if x is None else x.double()  # noqa: E731
            ro, rs = dc.memory_step_reference(*(d64(x) for x in (q, k, v, g, beta)), delta, state.double(),
                                              nw.double(), gate.double(), 1e-6, D**-0.5)
            dev = lambda x: None if x is None else x.to(device)  # noqa: E731
            st = state.to(device)
            o = dc.memory_step(*(dev(x) for x in (q, k, v, g, beta)), delta, st, nw.to(device), gate.to(device),
                               1e-6, D**-0.5)
            if rel(o, ro) > 1e-3 or rel(st, rs) > 1e-3:
                failures.append(f"memory {name} B{B} H{H} Hkv{Hkv} D{D}: out {rel(o, ro):.2e} state {rel(st, rs):.2e}")
    return failures


def cache_cases(device: str) -> list[str]:
    """The cache-reading memory step and the cache write against their references (GQA, Hkv=3)."""
    failures = []
    B, H, Hkv, D, S, W = 3, 6, 3, 64, 2, 5
    for name, g_idx, beta_idx, delta, G in [("gdn", 0, 1, True, 2), ("deltanet", -1, 0, True, 1),
                                             ("mamba2", 0, 1, False, 2)]:
        gen = torch.Generator().manual_seed(G + delta)
        keys, values = torch.randn(B, Hkv, S + W, D, generator=gen), torch.randn(B, Hkv, S + W, D, generator=gen)
        ring = torch.rand(B, W, H, G, generator=gen)
        if g_idx >= 0:
            ring[..., g_idx] = -ring[..., g_idx]
        cursor = torch.tensor([7, 9, 13])
        q, gate = torch.randn(B, H, D, generator=gen), torch.randn(B, H, generator=gen)
        state, nw = torch.randn(B, H, D, D, generator=gen) * 0.1, torch.rand(D, generator=gen) + 0.5
        ref_state = state.double()
        o_proj = torch.randn(H, D, D, generator=gen) / D**0.5
        ro = dc.memory_step_from_cache_reference(q.double(), keys.double(), values.double(), ring.double(), cursor, S,
                                                 W, g_idx, beta_idx, delta, ref_state, nw.double(), gate.double(),
                                                 1e-6, D**-0.5, o_proj.double())
        st = state.to(device)
        o = dc.memory_step_from_cache(*(x.to(device) for x in (q, keys, values, ring, cursor)), S, W, g_idx, beta_idx,
                                      delta, st, nw.to(device), gate.to(device), 1e-6, D**-0.5, o_proj.to(device))
        if rel(o, ro) > 1e-3 or rel(st, ref_state) > 1e-3:
            failures.append(f"memory from cache {name}: out {rel(o, ro):.2e} state {rel(st, ref_state):.2e}")
    # Gates arrive already rounded to the storage dtype (as the AHN attention rounds them).
    # v a strided view, as the attention's slice of its fused k/v/gate projection
    wide = torch.randn(B, 3 * Hkv * D)
    new_k, new_g = torch.randn(B, Hkv, D), torch.rand(B, H, 2).bfloat16().float()
    new_v = wide[:, 5 : 5 + Hkv * D].view(B, Hkv, D)
    want = [keys.clone(), values.clone(), ring.to(torch.bfloat16), torch.full((B, S + W), -1, dtype=torch.int32),
            torch.tensor([5, 6, 7]), cursor.clone()]
    got = [x.clone().to(device) for x in want]
    dc.cache_write_reference(*want[:4], new_k, new_v, new_g, *want[4:], S, W)
    dev_v = wide.to(device)[:, 5 : 5 + Hkv * D].view(B, Hkv, D)
    dc.cache_write(*got[:4], new_k.to(device), dev_v, new_g.to(device), *got[4:], S, W)
    if not all(torch.equal(a.cpu(), b) for a, b in zip(got, want, strict=True)):
        failures.append("cache write differs from its reference")
    # While filling: given positions (a sink, padding, a window token)
    pos = torch.tensor([1, -1, 4])
    want = [keys.clone(), values.clone(), ring.to(torch.bfloat16), torch.full((B, S + W), -1, dtype=torch.int32),
            torch.tensor([1, 0, 4]), torch.tensor([1, 3, 4])]
    got = [x.clone().to(device) for x in want]
    dc.cache_write_reference(*want[:4], new_k, new_v, new_g, *want[4:], S, W, pos)
    dc.cache_write(*got[:4], new_k.to(device), dev_v, new_g.to(device), *got[4:], S, W, pos.to(device))
    if not all(torch.equal(a.cpu(), b) for a, b in zip(got, want, strict=True)):
        failures.append("cache write with positions differs from its reference")
    return failures


def fenwick_slots(pos: torch.Tensor, H: int, L: int, D: int, gen: torch.Generator):
    """(occupied [N, 1, L, 1, 1], slots a state at ``pos`` can hold: random where occupied, 0
    elsewhere; the same with NaN where empty, which a step must neither read nor keep)."""
    from hippolm.ops.loglinear import occupied_levels

    occupied = occupied_levels(pos, L)[:, None, :, None, None]
    clean = torch.randn(len(pos), H, L, D, D, generator=gen) * 0.1 * occupied
    return occupied, clean, torch.where(occupied, clean, float("nan"))


def loglinear_cases(device: str) -> list[str]:
    """The in-place log-linear step (Fenwick carry, decay, delta rule, level read) against
    step_unchecked in float64, sequences at different positions (0, mid-block, a power of two: the
    carry over every level, the last one the levels hold); with a ``valid`` mask, the sequences where it is False
    keep their slots and position and read 0. Slots no state at that position can occupy hold
    garbage (NaN) that the step must neither read nor overwrite."""
    from hippolm.ops import LogLinearState
    from hippolm.ops.loglinear import occupied_levels, step_unchecked

    failures = []
    for name, has_g, has_beta in [("gdn", True, True), ("mamba2", True, False), ("deltanet", False, True)]:
        for N, H, D, L in [(3, 2, 32, 5), (2, 4, 128, 7)]:
            gen = torch.Generator().manual_seed(D + L)
            q, k = (torch.nn.functional.normalize(torch.randn(N, H, D, generator=gen), dim=-1) for _ in range(2))
            v = torch.randn(N, H, D, generator=gen)
            g = -torch.rand(N, H, generator=gen) if has_g else None
            beta = torch.rand(N, H, generator=gen) if has_beta else None
            lam = torch.rand(N, H, L, generator=gen) + 0.5
            pos = torch.tensor([0, 5, 8][:N] if N == 3 else [1 << (L - 2), (1 << (L - 1)) - 1])
            occupied, clean, slots = fenwick_slots(pos, H, L, D, gen)
            d64 = lambda x: None if x is None else x.double()  # noqa: E731
            ro, rs = step_unchecked(*(d64(x) for x in (q, k, v, g, beta, lam)),
                                    LogLinearState(clean.double(), pos), 0.3, check_levels=False)
            after = occupied_levels(rs.position, L)[:, None, :, None, None]
            dev = lambda x: None if x is None else x.to(device)  # noqa: E731
            for valid in (None, torch.tensor([True, False, True][:N])):
                state = LogLinearState(slots.clone().to(device), pos.clone().to(device))  # the step is in place
                ptr = state.slots.data_ptr()
                o = dc.loglinear_step_(*(dev(x) for x in (q, k, v, g, beta, lam)), state, 0.3, valid=dev(valid))
                want_o, want_s, want_p = ro, rs.slots, rs.position
                stepped = torch.ones(N, dtype=torch.bool) if valid is None else valid
                garbage = ~(occupied | (after & stepped[:, None, None, None, None])).expand_as(slots)
                if valid is not None:  # no step where not valid
                    want_o = ro * valid[:, None, None]
                    want_s = torch.where(valid[:, None, None, None, None], rs.slots, clean.double())
                    want_p = torch.where(valid, rs.position, pos)
                got_s = state.slots.cpu()
                if (rel(o, want_o) > 1e-4 or rel(torch.where(garbage, 0.0, got_s), want_s) > 1e-4
                        or not got_s[garbage].isnan().all() or state.slots.data_ptr() != ptr
                        or state.position.tolist() != want_p.tolist()):
                    failures.append(f"loglinear step {name} N{N} H{H} D{D} L{L} valid={valid}: out "
                                    f"{rel(o, want_o):.2e} slots {rel(state.slots, want_s):.2e}")
    return failures


def loglinear_cache_cases(device: str) -> list[str]:
    """The log-linear step reading the evicted token from an AHN cache (GQA, Hkv=3) against its
    float64 reference: one sequence whose slot holds a sink's copy takes no step; NaN in the level
    slots no state at that position occupies must be neither read nor overwritten."""
    from hippolm.ops import LogLinearState
    from hippolm.ops.loglinear import occupied_levels

    failures = []
    B, H, Hkv, D, S, W, L = 3, 6, 3, 32, 2, 5, 6
    cursor, pos = torch.tensor([7, 9, 13]), torch.tensor([8, 5, 3])
    slot = S + cursor % W
    for name, g_idx, beta_idx, kscale_idx, G in [("gdn", 0, 1, -1, 2), ("mamba2", 0, -1, 1, 2),
                                                 ("deltanet", -1, 0, -1, 1)]:
        gen = torch.Generator().manual_seed(G + 10 * (kscale_idx + 1))
        keys, values = torch.randn(B, Hkv, S + W, D, generator=gen), torch.randn(B, Hkv, S + W, D, generator=gen)
        ring = torch.rand(B, W, H, G, generator=gen)
        if g_idx >= 0:
            ring[..., g_idx] = -ring[..., g_idx]
        slot_pos = torch.randint(0, 50, (B, S + W), generator=gen)
        slot_pos[torch.arange(B), slot] = torch.tensor([10, 1, 7])  # 1 < S: a sink's ring copy, no step
        q, lam = torch.randn(B, H, D, generator=gen), torch.rand(B, H, L, generator=gen) + 0.5
        occupied, clean, slots = fenwick_slots(pos, H, L, D, gen)
        ref = LogLinearState(clean.double(), pos.clone())
        ro = dc.loglinear_step_from_cache_reference(q.double(), keys.double(), values.double(), ring.double(),
                                                    slot_pos, cursor, S, W, g_idx, beta_idx, kscale_idx,
                                                    lam.double(), ref, 0.3)
        stepped = torch.tensor([True, False, True])
        garbage = ~(occupied | (occupied_levels(ref.position, L)[:, None, :, None, None]
                                & stepped[:, None, None, None, None])).expand_as(clean)
        state = LogLinearState(slots.to(device), pos.clone().to(device))
        o = dc.loglinear_step_from_cache_(*(x.to(device) for x in (q, keys, values, ring, slot_pos, cursor)), S, W,
                                          g_idx, beta_idx, kscale_idx, lam.to(device), state, 0.3)
        got = state.slots.cpu()
        if (rel(o, ro) > 1e-4 or rel(torch.where(garbage, 0.0, got), ref.slots) > 1e-4
                or not got[garbage].isnan().all() or state.position.tolist() != [9, 5, 4]
                or ref.position.tolist() != [9, 5, 4] or (ro[1] != 0).any()):
            failures.append(f"loglinear step from cache {name}: out {rel(o, ro):.2e} slots "
                            f"{rel(torch.where(garbage, 0.0, got), ref.slots):.2e} positions {state.position.tolist()}")
    return failures


def step_cases(device: str) -> list[str]:
    """The out-of-place decode steps behind ops.*_step against their float64 references: the
    linear ones (SSD, delta rule, GDN) and the log-linear one, with and without a state; the old
    state is left as it is, and a log-linear state's empty slots (NaN) are neither read nor kept."""
    from hippolm.ops import LogLinearState, reference
    from hippolm.ops.loglinear import step_unchecked

    failures = []
    for name, has_g, has_beta in [("ssd", True, False), ("delta_rule", False, True), ("gdn", True, True)]:
        for B, H, D, L in [(2, 3, 32, 5), (1, 2, 128, 7)]:
            gen = torch.Generator().manual_seed(D + L + has_g)
            q, k = (torch.nn.functional.normalize(torch.randn(B, H, D, generator=gen), dim=-1) for _ in range(2))
            v = torch.randn(B, H, D, generator=gen)
            g = -torch.rand(B, H, generator=gen) if has_g else None
            beta = torch.rand(B, H, generator=gen) if has_beta else None
            d64 = lambda x: None if x is None else x.double()  # noqa: E731
            dev = lambda x: None if x is None else x.to(device)  # noqa: E731
            state = torch.randn(B, H, D, D, generator=gen) * 0.1
            for s in (None, state):
                ro, rs = reference.step(*(d64(x) for x in (q, k, v, g, beta, s)), 0.3)
                kept = None if s is None else s.clone().to(device)
                o, new = dc.recurrent_step(*(dev(x) for x in (q, k, v, g, beta)), kept, 0.3)
                if (rel(o, ro) > 1e-4 or rel(new, rs) > 1e-4
                        or (kept is not None and not torch.equal(kept.cpu(), s))):
                    failures.append(f"step {name} D{D} state={s is not None}: out {rel(o, ro):.2e} "
                                    f"state {rel(new, rs):.2e}")
            pos = torch.tensor([1 << (L - 2), 6][:B])
            _, clean, slots = fenwick_slots(pos, H, L, D, gen)
            lam = torch.rand(B, H, L, generator=gen) + 0.5
            for st in (None, LogLinearState(clean, pos)):
                ro, rs = step_unchecked(*(d64(x) for x in (q, k, v, g, beta, lam)),
                                        None if st is None else LogLinearState(clean.double(), pos), 0.3)
                given = None if st is None else LogLinearState(slots.clone().to(device), pos.clone().to(device))
                o, new = dc.loglinear_step(*(dev(x) for x in (q, k, v, g, beta, lam)), given, 0.3)
                untouched = given is None or (given.slots.cpu().nan_to_num(7.0).equal(slots.nan_to_num(7.0))
                                              and given.position.tolist() == pos.tolist())
                if (rel(o, ro) > 1e-4 or rel(new.slots, rs.slots) > 1e-4
                        or new.position.tolist() != rs.position.tolist() or not untouched):
                    failures.append(f"loglinear step {name} D{D} L{L} state={st is not None}: out {rel(o, ro):.2e} "
                                    f"slots {rel(new.slots, rs.slots):.2e}")
    return failures


def standalone_decode_case(device: str) -> list[str]:
    """A float32 standalone LM with every mixer: prefill then token-by-token decode equals one full
    forward, and the decode steps of its recurrent mixers run the step kernels (launches counted)."""
    from hippolm.models.standalone import MIXER_TYPES, HippoCache, HippoConfig, HippoForCausalLM

    launches = {}

    class Counted:  # kernel[grid](...) with a count per kernel
        def __init__(self, name):
            self.name, self.kernel = name, getattr(dc, name)

        def __getitem__(self, grid):
            launches[self.name] = launches.get(self.name, 0) + 1
            return self.kernel[grid]

    names = ("_recurrent_step_kernel", "_loglinear_step_kernel")
    cfg = HippoConfig(vocab_size=64, hidden_size=64, num_hidden_layers=len(MIXER_TYPES), num_attention_heads=2,
                      mixer=list(MIXER_TYPES), window=5, max_position=64)
    torch.manual_seed(0)
    model = HippoForCausalLM(cfg).to(device).eval()
    x = torch.randint(0, 64, (2, 12), device=device)
    try:
        for name in names:
            setattr(dc, name, Counted(name))
        with torch.no_grad():
            full = model(x).logits
            cache = HippoCache(cfg.num_hidden_layers)  # updated in place by each call
            model(x[:, :9], cache=cache, use_cache=True)
            steps = [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(9, 12)]
    finally:
        for name in names:
            setattr(dc, name, getattr(dc, name).kernel)
    err = rel(torch.cat(steps, 1), full[:, 9:])
    # 3 steps x (mamba2, gdn) and x (loglinear_mamba2, loglinear_gdn)
    if err > 1e-4 or [launches.get(n) for n in names] != [6, 6]:
        return [f"standalone decode: logits {err:.2e} from the full forward, step launches {launches}"]
    return []


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    dtypes = (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)
    failures = (attention_cases(device, dtypes) + cache_attention_cases(device, dtypes) + memory_cases(device)
                + cache_cases(device) + loglinear_cases(device) + loglinear_cache_cases(device) + step_cases(device)
                + standalone_decode_case(device))
    print("\n".join(failures) or "all decode kernel cases pass")
    sys.exit(1 if failures else 0)
