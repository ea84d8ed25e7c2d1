#!/usr/bin/env bash
# The GPU suite: build for the visible GPU, run the GPU tests, run the benchmarks, write
# benchmarks/results/<date>-<gpu>.json and .md. Works offline; uses the python on PATH (or $PYTHON).
# Usage: bash benchmarks/gpu_suite.sh   (or: make gpu-suite)
#   MASKDM_RESULTS_DIR=DIR   where the results and logs go (default benchmarks/results)
#   SUITE_PARTS="build tests bench"   a subset of the phases, in this order
#   BENCH_FILES="benchmarks/test_bench_attention.py ..."   a subset of the benchmark files
#   BUILD_TIMEOUT, TEST_TIMEOUT, BENCH_TIMEOUT, ATTN_TIMEOUT   per-phase limits in seconds
# Every phase has a time limit, so a slow phase cannot starve the ones after it; logs are written as they run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET
OUTDIR=${MASKDM_RESULTS_DIR:-benchmarks/results}
PARTS=${SUITE_PARTS:-build tests bench}
BENCH_FILES=${BENCH_FILES:-benchmarks/test_bench_gather_patches.py benchmarks/test_bench_masked_noise_loss.py \
benchmarks/test_bench_scatter_patches.py benchmarks/test_bench_attention.py benchmarks/test_bench_train_step.py}
mkdir -p "$OUTDIR"
status=0
t0=$(date +%s)
phase() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
has() { [[ " $PARTS " == *" $1 "* ]]; }

if has build; then
  phase build
  # Only the visible GPU's arch: one nvcc pass per file.
  arch=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo 9.0)
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} timeout "${BUILD_TIMEOUT:-300}" \
    $PY -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUTDIR/build.log" 2>&1 \
    || { echo "build failed: tail of build.log"; tail -30 "$OUTDIR/build.log"; status=1; }
fi
$PY -c "import maskdm_kernels._C" 2>/dev/null || echo "extension not loadable: the cuda/cpu backends will be skipped"
$PY -m maskdm_kernels.info | tee "$OUTDIR/info.txt"

if has tests; then
  phase "GPU tests"
  # One fixed Triton attention configuration (autotuning each test's shape would compile ~20x more kernels);
  # the benchmarks below autotune. xdist spreads the compilation over the CPU cores.
  xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-8}")
  MASKDM_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-240}" $PY -m pytest tests -q -k cuda -p no:cacheprovider $xdist \
    -rfE --tb=short --junitxml="$OUTDIR/tests.xml" >"$OUTDIR/tests.log" 2>&1
  rc=$?
  tail -25 "$OUTDIR/tests.log"
  [ $rc -eq 0 ] || { echo "GPU tests: exit $rc"; status=1; }
fi

if has bench; then
  # One pytest run (and JSON) per file, each under its own limit: a file that runs long loses only itself.
  # pytest-benchmark's own rounds are short: on a GPU each throughput comes from CUDA events (common.record).
  for f in $BENCH_FILES; do
    name=$(basename "$f" .py)
    phase "$name"
    limit=${BENCH_TIMEOUT:-180}
    case $name in *attention*) limit=${ATTN_TIMEOUT:-240};; esac
    timeout "$limit" $PY -m pytest "$f" --benchmark-only -q -p no:cacheprovider -rfEs --tb=short \
      --benchmark-json="$OUTDIR/$name.json" --benchmark-max-time=0.05 --benchmark-min-rounds=3 \
      --benchmark-columns=median,rounds >"$OUTDIR/$name.log" 2>&1
    rc=$?
    grep -E "^(train step|  uvit|FAILED|ERROR)|passed|failed" "$OUTDIR/$name.log" | tail -25
    [ $rc -eq 0 ] || { echo "$name: exit $rc"; status=1; }
  done
  $PY benchmarks/summarize.py --bench "$OUTDIR"/test_bench_*.json --tests "$OUTDIR/tests.xml" \
    --info "$OUTDIR/info.txt" --outdir "$OUTDIR" || status=1
fi
phase "done, status $status"
exit $status
