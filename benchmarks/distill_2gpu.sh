#!/usr/bin/env bash
# 2-GPU DDP check of `hippolm distill` (torchrun + NCCL) on the lent nvidia-h200-x2, not yet run.
# One process on GPU 0 with --batch-size 4, then torchrun over 2 GPUs with --batch-size 2 each
# (the same samples per step), on the same data and schedule: the loss curves and final memories
# must agree up to bf16 reduction-order noise. Writes $OUT/distill_2gpu.json and both run folders.
#
# The device image lacks `datasets` and its pure-Python needs: carry them as wheels, e.g. here
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl datasets dill multiprocess
# (see the device README), then run with carry [".whl"]:  bash benchmarks/distill_2gpu.sh
# BASE=/path/to/model DATA="files..." use a real base and corpus instead of the random fixture.
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WORK=${WORK:-/tmp/distill2}; rm -rf "$WORK"; mkdir -p "$WORK"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, datasets; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'datasets', datasets.__version__, 'gpus', torch.cuda.device_count())" || exit 1

if [ -z "${BASE:-}" ]; then
  python3 -P benchmarks/distill_fixture.py "$WORK/fixture" || exit 1
  BASE=$WORK/fixture/base; DATA=$WORK/fixture/data
fi
ARGS=(--base "$BASE" --data $DATA --memory "${MEMORY:-gdn}" --seq-len "${SEQ_LEN:-4096}"
      --window "${WINDOW:-512}" --sinks "${SINKS:-64}" --steps "${STEPS:-40}" --lr "${LR:-1e-3}"
      --save-every 20 --cache-dir "$WORK/hf-cache" --seed 0)

t0=$(date +%s.%N)
CUDA_VISIBLE_DEVICES=0 python3 -m hippolm.train.distill "${ARGS[@]}" --batch-size 4 --out "$WORK/one" \
  2>&1 | tr '\r' '\n' | grep -v '^distill: ' | tee "$OUT/one.log" | tail -5
rc1=${PIPESTATUS[0]}
t1=$(date +%s.%N)
torchrun --standalone --nproc-per-node 2 -m hippolm.train.distill "${ARGS[@]}" --batch-size 2 --out "$WORK/two" \
  2>&1 | tr '\r' '\n' | grep -v '^distill: ' | tee "$OUT/two.log" | tail -5
rc2=${PIPESTATUS[0]}
t2=$(date +%s.%N)

python3 - "$WORK" "$OUT/distill_2gpu.json" "$rc1" "$rc2" "$t0" "$t1" "$t2" <<'EOF'
import json, sys, datetime, torch, transformers
from pathlib import Path
from safetensors.torch import load_file
work, dest, rc1, rc2, t0, t1, t2 = Path(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:5]), *map(float, sys.argv[5:])
res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "device": torch.cuda.get_device_name(0),
       "gpus": torch.cuda.device_count(), "torch": torch.__version__, "transformers": transformers.__version__,
       "exit_codes": [rc1, rc2], "seconds": {"one_gpu": t1 - t0, "two_gpus": t2 - t1}}
if rc1 == 0 and rc2 == 0:
    rows = {k: [json.loads(x) for x in (work / k / "metrics.jsonl").read_text().splitlines()] for k in ("one", "two")}
    a, b = (load_file(str(work / k / "memory" / "memory.safetensors")) for k in ("one", "two"))
    rel = max(((a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-12)).item() for n in a)
    res.update(loss_one=[r["loss"] for r in rows["one"]], loss_two=[r["loss"] for r in rows["two"]],
               tokens_per_s_one=sorted(r["tokens_per_s"] for r in rows["one"])[len(rows["one"]) // 2],
               tokens_per_s_two=sorted(r["tokens_per_s"] for r in rows["two"])[len(rows["two"]) // 2],
               max_rel_diff_memory=rel, args=json.loads((work / "two" / "args.json").read_text()))
    print(f"loss one GPU {res['loss_one'][0]:.4f} -> {res['loss_one'][-1]:.4f}; two GPUs {res['loss_two'][0]:.4f} -> "
          f"{res['loss_two'][-1]:.4f}; max relative difference of the memories {rel:.2e}; tokens/s (median) "
          f"{res['tokens_per_s_one']:.0f} vs {res['tokens_per_s_two']:.0f}")
Path(dest).write_text(json.dumps(res, indent=2))
EOF
[ "$rc1" = 0 ] && [ "$rc2" = 0 ]
