#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool), from the repo root, with .whl carried:
#   the AHN CUDA tests (eager vs CUDA-graph decode vs one forward), then the decode benchmark.
# Usage: bash benchmarks/ahn_gpu.sh [what: tests|bench|generate|all]
# generate (not in all): benchmarks/generate_speed.py, generate() vs generate(cuda_graph=True) (GEN_ARGS: its options)
set -uo pipefail
what=${1:-all}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# SRC: the package tree to run (default src; e.g. one with an older kernel, for an A/B in one call)
export PYTHONPATH=/tmp/site:${SRC:-$PWD/src} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/triton_cache.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout -s INT -k 15 ${TEST_TIMEOUT:-200} python3 -m pytest -v -p no:cacheprovider tests/test_ahn_cuda.py tests/test_decode_ops.py 2>&1 \
    | tee "$OUT/test_ahn_cuda.log" | tail -30
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
  timeout ${BENCH_TIMEOUT:-300} python3 -P benchmarks/ahn_decode.py ${BENCH_ARGS:-} --json "$OUT/ahn_decode_$dev.json" 2>&1 \
    | tee "$OUT/ahn_decode_$dev.log"
fi
if [ "$what" = generate ]; then
  dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
  timeout ${GEN_TIMEOUT:-300} python3 benchmarks/generate_speed.py ${GEN_ARGS:-} --json "$OUT/generate_speed_$dev.json" 2>&1 \
    | tee "$OUT/generate_speed_$dev.log"
fi
