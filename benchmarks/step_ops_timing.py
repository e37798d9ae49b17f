"""The decode steps behind ``hippolm.ops.*_step`` (what the standalone LMs run per token and layer),
one kernel each on CUDA (hippolm.ops.decode.recurrent_step, loglinear_step), against the torch
reference steps they replace (reference.step, loglinear.step_unchecked): time per call and the
largest relative difference of the read and the new state. bf16 q/k/v, float32 states, B = 8,
H = 16, d = 128; the log-linear state has 21 levels at the given positions (its occupied slots
filled, the step reads only those).

    python benchmarks/step_ops_timing.py --json benchmarks/results/step_ops_timing_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from functools import partial

import torch
import triton
from ops_gpu import cuda_time_ms  # benchmarks/ is on the path when run as a script

from hippolm.ops import LogLinearState, reference
from hippolm.ops import decode as dc
from hippolm.ops.loglinear import occupied_levels, step_unchecked


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--positions", default="98304,130047", help="log-linear state positions")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    B, H, d, L, dev = args.batch, 16, 128, 21, "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=gen)

    q, k = (torch.nn.functional.normalize(rnd(B, H, d), dim=-1) for _ in range(2))
    v = rnd(B, H, d)
    g = -torch.rand(B, H, device=dev, generator=gen)
    beta = torch.rand(B, H, device=dev, generator=gen)
    state = rnd(B, H, d, d, dtype=torch.float32) * 0.1
    rows = []

    def compare(row: dict, kernel, ref, state_of) -> None:
        """Time two argument-free calls and record how far their (read, state) differ."""
        (o, s), (ro, rs) = kernel(), ref()
        row.update(kernel_ms=cuda_time_ms(kernel), reference_ms=cuda_time_ms(ref), rel_diff_o=rel(o, ro),
                   rel_diff_state=rel(state_of(s), state_of(rs)))
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name, gg, bb in [("ssd_step", g, None), ("gated_delta_rule_step", g, beta)]:
        compare({"op": name}, partial(dc.recurrent_step, q, k, v, gg, bb, state),
                partial(reference.step, q, k, v, gg, bb, state), lambda s: s)
    lam = torch.rand(B, H, L, device=dev, generator=gen) + 0.5
    for p in (int(x) for x in args.positions.split(",")):
        pos = torch.full((B,), p, dtype=torch.long, device=dev)
        occupied = occupied_levels(pos, L)[:, None, :, None, None]
        st = LogLinearState(rnd(B, H, L, d, d, dtype=torch.float32) * 0.1 * occupied, pos)
        compare({"op": "loglinear_gated_delta_rule_step", "position": p,
                 "levels_read": int(occupied[0, 0, :, 0, 0].sum())},
                partial(dc.loglinear_step, q, k, v, g, beta, lam, st),
                partial(step_unchecked, q, k, v, g, beta, lam, st, None, check_levels=False), lambda s: s.slots)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "batch": B, "heads": H, "head_dim": d, "levels": L}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
