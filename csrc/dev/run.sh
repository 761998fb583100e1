#!/usr/bin/env bash
# Build one workbench program for one ISA and run it pinned to CPU ${CPU:-0}:
#   csrc/dev/run.sh PROGRAM ISA [ARGS...]      e.g. csrc/dev/run.sh attn_fp32 avx512 2 4096 4
# ISA flags are the package's (lampe/_buildflags.py), so the workbench compiles what ships.
set -euo pipefail
cd "$(dirname "$0")/../.."
prog=$1 isa=$2
shift 2
unit=kernels_$isa.c
flags=$(python3 lampe/_buildflags.py isa "$unit")
[ -n "$flags" ] || [ "$isa" = scalar ] || { echo "unknown ISA $isa" >&2; exit 2; }
out=${DEV_OUT:-/tmp/lampe-dev}
mkdir -p "$out"
${CC:-cc} -std=c11 -O3 -Wall -Wextra -Wno-unused-parameter -Wno-unused-function $flags \
    "csrc/dev/$prog.c" -o "$out/${prog}_$isa" -lm
exec taskset -c "${CPU:-0}" "$out/${prog}_$isa" "$@"
