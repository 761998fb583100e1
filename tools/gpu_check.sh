#!/usr/bin/env bash
# The GPU check of lampe's CUDA kernels, run as-is on a machine with an NVIDIA GPU (sm_80+), torch
# with CUDA, nvcc, transformers, and no network. Budget: under 8 minutes on an H200.
#   1. build lampe._C and lampe._cuda in place (LAMPE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0 unless set,
#      MAX_JOBS = the cores);
#   2. tests/test_cuda.py with LAMPE_REQUIRE_CUDA=1 (a missing extension fails), and
#      tests/test_cuda_host.py;
#   3. compute-sanitizer --tool memcheck and --tool racecheck on one small case;
#   4. bench/attention_cuda.py --quick (BENCH_ARGS="" for the full one, BENCH_TIMEOUT seconds).
# Logs and results go to $OUT when set (else build/gpu_check). Exit status: non-zero if the build,
# the tests or the sanitizer failed.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-build/gpu_check}
mkdir -p "$LOG"
PY=${PYTHON:-python}
export LAMPE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
step() { echo "== $1 ($(date +%T))" | tee -a "$LOG/summary.txt"; }

step device
{ nvidia-smi; nvcc --version | tail -2
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'transformers', transformers.__version__)"
} > "$LOG/device.txt" 2>&1
tail -3 "$LOG/device.txt" | tee -a "$LOG/summary.txt"

step "build (arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
SECONDS=0
if timeout 300 $PY setup.py build_ext --inplace -b build/gpu -t build/gpu/tmp > "$LOG/build.log" 2>&1; then
    echo "built in ${SECONDS}s" | tee -a "$LOG/summary.txt"
else
    echo "BUILD FAILED after ${SECONDS}s (tail of build.log:)" | tee -a "$LOG/summary.txt"
    tail -40 "$LOG/build.log" | tee -a "$LOG/summary.txt"
    exit 1
fi
$PY -c "import lampe; lampe.show_config()" 2>&1 | tail -2 | tee -a "$LOG/summary.txt"

step tests
# a hung kernel must not eat the run: a per-test limit where pytest-timeout is installed
per_test=()
$PY -c "import pytest_timeout" 2> /dev/null && per_test=(--timeout=90)
LAMPE_REQUIRE_CUDA=1 timeout 240 $PY -m pytest -q -rs --tb=short "${per_test[@]}" tests/test_cuda.py \
    tests/test_cuda_host.py > "$LOG/tests.log" 2>&1 || status=1
tail -15 "$LOG/tests.log" | tee -a "$LOG/summary.txt"

step "compute-sanitizer memcheck"
if command -v compute-sanitizer > /dev/null; then
    LAMPE_REQUIRE_CUDA=1 timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
        $PY -m pytest -q tests/test_cuda.py -k sanitizer -p no:cacheprovider > "$LOG/sanitizer.log" 2>&1 || status=1
    grep -E "ERROR SUMMARY|passed|failed" "$LOG/sanitizer.log" | tail -3 | tee -a "$LOG/summary.txt"
    # shared-memory hazards (the prompt kernel rewrites its query tile between key blocks)
    LAMPE_REQUIRE_CUDA=1 timeout 120 compute-sanitizer --tool racecheck --error-exitcode 9 \
        $PY -m pytest -q tests/test_cuda.py -k sanitizer -p no:cacheprovider >> "$LOG/sanitizer.log" 2>&1 || status=1
    grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" "$LOG/sanitizer.log" | tail -2 | tee -a "$LOG/summary.txt"
else
    echo "compute-sanitizer not found: skipped" | tee -a "$LOG/summary.txt"
fi

# BENCH_ARGS="" runs the full benchmark (prompt at 128K too; give it BENCH_TIMEOUT=240)
step "benchmark (${BENCH_ARGS---quick})"
timeout "${BENCH_TIMEOUT:-150}" $PY bench/attention_cuda.py ${BENCH_ARGS---quick} --json "$LOG/bench_cuda.json" \
    > "$LOG/bench.log" 2>&1 || echo "benchmark did not finish (see bench.log)" | tee -a "$LOG/summary.txt"
cat "$LOG/bench.log" | tee -a "$LOG/summary.txt"
step "done: status $status"
exit $status
