"""Operator calls of one AHN decode step on CPU, while the window fills and once it is full, per
memory type: a tiny random Qwen2 model (2 layers, window 16, 4 sinks, batch 2), top-level aten calls
from the profiler. On a GPU each call is at least one kernel, and at batch 8 a decode step is
launch-bound, so this counts what a step costs beyond the bytes it reads (no GPU needed).

    python benchmarks/decode_op_count.py --json benchmarks/results/decode_op_count_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_ahn import ahn  # the tests' tiny models

from hippolm.ahn import MEMORY_TYPES


def top_level_calls(model, ids: torch.Tensor, prefix: int) -> int:
    """aten calls (not nested in another aten call) of decoding token ``prefix`` after a prefill."""
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :prefix], past_key_values=cache)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids[:, prefix : prefix + 1], past_key_values=cache)
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 64))
    rows = []
    for memory in MEMORY_TYPES:
        model = ahn("qwen2", memory, window=16, sinks=4)
        row = {"memory": memory, "filling": top_level_calls(model, ids, 5),
               "steady": top_level_calls(model, ids, 40), "layers": 2}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        meta = {"device": "cpu", "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                "model": "tiny Qwen2 (tests/test_ahn.py), window 16, sinks 4, batch 2"}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
