#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool), from the repo root, with .whl carried (FLA, einops):
#   our Triton kernels' CUDA tests against the float64 reference, then benchmarks/kernel_bench.py.
# Fits a 10-minute cap: tests <= TEST_TIMEOUT (210 s), benchmark <= BENCH_TIMEOUT (320 s) with its own
# budget a little shorter so it ends cleanly. Results and logs go to $OUT (default /tmp/out):
#   kernels_<gpu>.json (copy to benchmarks/results/), test_kernels_cuda.log, kernels_<gpu>.log.
# TEST_K: a pytest -k expression selecting some of the tests.
# Usage: bash benchmarks/kernels_gpu.sh [what: tests|bench|errors|flags|profile|all, or a comma list like errors,tests]
#        [extra benchmark args, e.g. --quick]
# errors: benchmarks/kernel_errors.py (every error per output/gradient and per chunk, <= ERR_TIMEOUT s)
#   to kernel_errors_<gpu>.json (ERR_ARGS: its options, e.g. "--op loglinear_gated_delta_rule --shapes 1,3000,4");
#   run it first: the tests then reuse its compiled kernels.
set -uo pipefail
what=${1:-all}
shift || true
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || echo "note: carried wheels not installed; FLA rows will be skipped"
# SRC: the package tree to run (default src; e.g. an older tree from `git archive REV src` for an A/B in one call)
export PYTHONPATH=/tmp/site:${SRC:-$PWD/src}:$PWD/tests PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/triton_cache.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
has() { [ "$what" = all ] || [[ ",$what," == *",$1,"* ]]; }
if has errors; then
  timeout ${ERR_TIMEOUT:-200} python3 -P benchmarks/kernel_errors.py ${ERR_ARGS:-} --json "$OUT/kernel_errors_$dev.json" 2>&1 \
    | tee "$OUT/kernel_errors_$dev.log" | grep -v "^ " | cut -c1-600
  echo "errors took $(( $(date +%s) - t0 )) s"
fi
if has tests; then
  timeout -s INT -k 15 ${TEST_TIMEOUT:-210} python3 -m pytest -v -p no:cacheprovider tests/test_kernels.py ${TEST_K:+-k "$TEST_K"} \
    --durations=5 -rA 2>&1 \
    | tee "$OUT/test_kernels_cuda.log" | tail -30
  echo "tests took $(( $(date +%s) - t0 )) s"
fi
if [[ ",$what," == *",flags,"* ]]; then  # not in 'all'. A/B timings of module-level kernel options, one
  # process each (benchmarks/flag_timing.py). FLAGS: space-separated module.ATTR=v1,v2[@module.ATTR=v,...]
  # (after @: options held fixed), e.g. "triton_loglinear.GRAD_OPERANDS=1,2 triton_loglinear.Q_V_PIECES=1,4@triton_loglinear.GRAD_OPERANDS=2";
  # FLAG_OP: the op (loglinear_ssd).
  i=0
  for spec in ${FLAGS:-}; do
    i=$((i + 1))
    flag=${spec%%@*}; fixed=(); [[ $spec == *@* ]] && IFS=, read -ra fixed <<< "${spec#*@}"
    sets=(); for f in "${fixed[@]}"; do sets+=(--set "$f"); done
    name=${flag%%=*}
    timeout ${FLAG_TIMEOUT:-90} python3 benchmarks/flag_timing.py --op ${FLAG_OP:-loglinear_ssd} --flag "$name" \
      --values "${flag#*=}" "${sets[@]}" --json "$OUT/flag_timing_${dev}_${i}_${name##*.}.json" 2>&1 | grep -v Warn
  done
fi
if [[ ",$what," == *",profile,"* ]]; then  # not in 'all'. benchmarks/gdn_profile.py: CUDA kernel times of
  # one fwd+bwd (PROF_ARGS: its options, default the log-linear GDN at 64k tokens; PROF_SETS: comma-separated
  # module.ATTR=v options, e.g. triton_gdn.LEVEL_TREE_SAVE=1,triton_gdn.LEVEL_TREE_LEAVES_BWD=0) to gdn_profile_<gpu>.json
  sets=(); IFS=, read -ra fixed <<< "${PROF_SETS:-}"; for f in "${fixed[@]}"; do sets+=(--set "$f"); done
  timeout ${PROF_TIMEOUT:-120} python3 benchmarks/gdn_profile.py ${PROF_ARGS:---ops loglinear_gated_delta_rule --no-tune} \
    "${sets[@]}" --json "$OUT/gdn_profile_$dev.json" 2>&1 | grep -v Warn | cut -c1-300
fi
if has bench; then
  timeout ${BENCH_TIMEOUT:-320} python3 benchmarks/kernel_bench.py --budget ${BENCH_BUDGET:-280} "$@" \
    --json "$OUT/kernels_$dev.json" 2>&1 | tee "$OUT/kernels_$dev.log"
fi
echo "total $(( $(date +%s) - t0 )) s"
