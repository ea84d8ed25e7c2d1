#!/usr/bin/env bash
# The GPU suite: build for the visible GPU, run the GPU tests, run the benchmarks, write
# benchmarks/results/<date>-<gpu>.json and .md. Works offline; uses the python on PATH (or $PYTHON).
# Usage: bash benchmarks/gpu_suite.sh   (or: make gpu-suite)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET
OUTDIR=${MASKDM_RESULTS_DIR:-benchmarks/results}
mkdir -p "$OUTDIR"
TMP=$(mktemp -d)
status=0

echo "== build (arch of the visible GPU)"
start=$(date +%s)
$PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" | tail -20
$PY -c "import maskdm_kernels._C" || { echo "extension failed to build or load"; status=1; }
echo "build: $(( $(date +%s) - start )) s"
$PY -m maskdm_kernels.info | tee "$TMP/info.txt"

echo "== GPU tests"
$PY -m pytest tests -q -x -k "cuda" -p no:cacheprovider --junitxml="$TMP/tests.xml" 2>&1 | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks"
$PY -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-json="$TMP/bench.json" \
    --benchmark-columns=median,rounds 2>&1 | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

$PY benchmarks/summarize.py --bench "$TMP/bench.json" --tests "$TMP/tests.xml" --info "$TMP/info.txt" \
    --outdir "$OUTDIR" || status=1
exit $status
