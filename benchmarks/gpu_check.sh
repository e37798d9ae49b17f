#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool), from the repo root, with .whl carried:
#   CUDA tests of the ops dispatch against the CPU float64 reference, then the ops benchmark.
# Usage: bash benchmarks/gpu_check.sh [what: tests|bench|all]
set -uo pipefail
what=${1:-all}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/triton_cache.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__)"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout ${TEST_TIMEOUT:-280} python3 -m pytest -q -p no:cacheprovider -s tests/test_ops_cuda.py 2>&1 \
    | tee "$OUT/test_ops_cuda.log" | tail -40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout ${BENCH_TIMEOUT:-280} python3 benchmarks/ops_gpu.py --json "$OUT/ops_gpu.json" 2>&1 | tee "$OUT/ops_gpu.log"
fi
