#!/usr/bin/env bash
# Compile check of lampe's CUDA sources, for machines without a GPU (CI):
#   - every csrc/cuda/*.cu with nvcc -c for sm_80 and sm_90a (no torch headers: plain C launchers);
#   - csrc/cuda/binding.cpp with g++ -std=c++20 -fsyntax-only against the torch headers of the
#     python given as $PYTHON (default: python), which may be the CPU wheel.
# Skips (exit 0, saying so) when nvcc or torch is missing; any compile error fails.
# Usage: tools/cuda_compile_check.sh            (JOBS=n to run n nvcc at once, default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
JOBS=${JOBS:-1}
NVCC=${NVCC:-$(command -v nvcc || true)}
status=0
if [ -z "$NVCC" ]; then
    echo "cuda_compile_check: nvcc not found: .cu sources NOT compiled (skipped)"
else
    echo "cuda_compile_check: $($NVCC --version | tail -1)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    ls csrc/cuda/*.cu | xargs -P "$JOBS" -I{} sh -c '
        f={}; o='"$tmp"'/$(basename "$f").o
        if '"$NVCC"' -std=c++17 -O3 --expt-relaxed-constexpr -Icsrc/cuda -c "$f" -o "$o" \
            -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
            -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a 2>"$o.log"; then
            echo "  ok   $f (sm_80, sm_90a)"
        else
            echo "  FAIL $f"; cat "$o.log"; exit 1
        fi' || status=1
fi
TORCH_INC=$($PYTHON -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))" 2>/dev/null || true)
PY_INC=$($PYTHON -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>/dev/null || true)
if [ -z "$TORCH_INC" ]; then
    echo "cuda_compile_check: torch not importable by $PYTHON: binding.cpp NOT checked (skipped)"
elif g++ -std=c++20 -fsyntax-only -Wall -Wextra -Wno-unused-parameter $TORCH_INC -I"$PY_INC" -Icsrc/cuda \
        csrc/cuda/binding.cpp; then
    echo "  ok   csrc/cuda/binding.cpp (g++ -std=c++20 -fsyntax-only, torch $($PYTHON -c 'import torch; print(torch.__version__)'))"
else
    echo "  FAIL csrc/cuda/binding.cpp"
    status=1
fi
exit $status
