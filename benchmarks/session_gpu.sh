#!/usr/bin/env bash
# One device call of several checks (each under its own time limit), run from the repo root with
# .whl and .gpu_cache carried. STEPS: a comma list of
#   decode   tests/test_decode_ops.py on CUDA (every decode kernel case, the ops' step kernels, a
#            standalone LM decoding through them) -> test_decode_ops_cuda.log
#   steps    benchmarks/step_ops_timing.py -> step_ops_timing.json
#   memstep  benchmarks/decode_step_timing.py $MEMSTEP_ARGS (the AHN memory's cached step per warps; with
#            --splits the decode attention per split count) -> decode_step_timing.json
#   kernels  tests/test_kernels.py -k "$TEST_K" -> test_kernels_cuda.log
#   chunk    benchmarks/chunk_timing.py --configs "$CHUNK_CONFIGS" -> chunk_timing.json
#   ahn      ahn_gpu.sh tests (the AHN CUDA tests and the decode kernel tests) -> ahn/test_ahn_cuda.log
#   generate ahn_gpu.sh generate (generate() vs generate(cuda_graph=True), GEN_ARGS) -> ahn/generate_speed_<gpu>.json
#   bench    kernels_gpu.sh bench $BENCH_ARGS (BENCH_TIMEOUT) -> bench/kernels_<gpu>.json
#   ab       kernels_gpu.sh bench $AB_ARGS on the tree in $AB_SRC (an older src, e.g. from
#            `git archive REV src | tar -x -C .gpu_stash/base`, carried), then on this one, each
#            <= AB_TIMEOUT s -> base/kernels_<gpu>.json, new/kernels_<gpu>.json (one call: the rows compare)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:${SRC:-$PWD/src}:$PWD/tests:$PWD/benchmarks PYTHONUNBUFFERED=1 CACHE_BACK=${CACHE_BACK:-0}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/triton_cache.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
has() { [[ ",${STEPS:-decode,steps}," == *",$1,"* ]]; }
t0=$(date +%s)
if has decode; then
  timeout -s INT -k 15 ${DECODE_TIMEOUT:-240} python3 -m pytest -v -p no:cacheprovider tests/test_decode_ops.py -rA --durations=3 2>&1 \
    | tee "$OUT/test_decode_ops_cuda.log" | tail -12
  echo "decode tests done at $(( $(date +%s) - t0 )) s"
fi
if has steps; then
  timeout ${STEPS_TIMEOUT:-120} python3 benchmarks/step_ops_timing.py --json "$OUT/step_ops_timing.json" 2>&1 | tail -20
  echo "step timing done at $(( $(date +%s) - t0 )) s"
fi
if has memstep; then
  timeout ${MEMSTEP_TIMEOUT:-120} python3 benchmarks/decode_step_timing.py ${MEMSTEP_ARGS:-} --json "$OUT/decode_step_timing.json" 2>&1 | tail -30
  echo "memory step timing done at $(( $(date +%s) - t0 )) s"
fi
if has kernels; then
  timeout -s INT -k 15 ${TEST_TIMEOUT:-150} python3 -m pytest -v -p no:cacheprovider tests/test_kernels.py ${TEST_K:+-k "$TEST_K"} -rA \
    2>&1 | tee "$OUT/test_kernels_cuda.log" | tail -12
  echo "kernel tests done at $(( $(date +%s) - t0 )) s"
fi
if has chunk; then
  timeout ${CHUNK_TIMEOUT:-150} python3 benchmarks/chunk_timing.py --configs "${CHUNK_CONFIGS:-default}" \
    --json "$OUT/chunk_timing.json" 2>&1 | grep -v Warn | tail -12
  echo "chunk timing done at $(( $(date +%s) - t0 )) s"
fi
for step in ahn generate; do
  if has $step; then
    what=tests; [ $step = generate ] && what=generate
    OUT=$OUT/ahn TEST_TIMEOUT=${AHN_TIMEOUT:-200} bash benchmarks/ahn_gpu.sh $what 2>&1 | grep -v Warn | tail -14
    echo "ahn $what done at $(( $(date +%s) - t0 )) s"
  fi
done
if has bench; then
  OUT=$OUT/bench BENCH_BUDGET=$(( ${BENCH_TIMEOUT:-190} - 20 )) BENCH_TIMEOUT=${BENCH_TIMEOUT:-190} \
    bash benchmarks/kernels_gpu.sh bench ${BENCH_ARGS:-} | grep -v Warn | tail -10
  echo "bench done at $(( $(date +%s) - t0 )) s"
fi
if has ab; then  # kernels_gpu.sh's bench on the older tree (SRC), then on this one
  args=${AB_ARGS:---lengths 8192,16384,65536 --ops loglinear_gated_delta_rule,attention --phases ours}
  for side in base new; do
    src=$PWD/src; [ $side = base ] && src=${AB_SRC:?set AB_SRC to the older tree src}
    OUT=$OUT/$side SRC=$src BENCH_BUDGET=$(( ${AB_TIMEOUT:-120} - 20 )) BENCH_TIMEOUT=${AB_TIMEOUT:-120} \
      bash benchmarks/kernels_gpu.sh bench $args | grep -v Warn | tail -8
    echo "bench $side done at $(( $(date +%s) - t0 )) s"
  done
fi
rm -f "$OUT/autotune.tgz"
