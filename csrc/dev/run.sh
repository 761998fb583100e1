#!/usr/bin/env bash
# Build one workbench program for one ISA and run it pinned to CPU ${CPU:-0}:
#   csrc/dev/run.sh PROGRAM ISA [ARGS...]      e.g. csrc/dev/run.sh attn_fp32 avx512 2048 4 7 1 5
# ISA: scalar, avx2, avx512, avx512bf16, amx (the package's flags for kernels_ISA.c, from
# lampe/_buildflags.py), or emu: plain AVX-512 with VDPBF16PS and the AMX tiles emulated
# (csrc/cpu/bf16_ops.h, amx_ops.h) at kernel level 4 (AMX), emu3 the same at level 3
# (VDPBF16PS). An avx512bf16 build emulates only the AMX tiles.
set -euo pipefail
cd "$(dirname "$0")/../.."
prog=$1 isa=$2
shift 2
f() { python3 lampe/_buildflags.py isa "kernels_$1.c"; }
case $isa in
    emu) flags="$(f avx512) -DLAMPE_BF16_EMU -DLAMPE_AMX_EMU -DLAMPE_LEVEL=4" ;;
    emu3) flags="$(f avx512) -DLAMPE_BF16_EMU -DLAMPE_AMX_EMU -DLAMPE_LEVEL=3" ;;
    avx512bf16) flags="$(f avx512bf16) -DLAMPE_AMX_EMU -DLAMPE_LEVEL=3" ;;
    amx) flags=$(f amx); [ -n "$flags" ] || flags="$(f avx512bf16) -mamx-tile -mamx-bf16"; flags="$flags -DLAMPE_LEVEL=4" ;;
    scalar) flags="" ;;
    *) flags=$(f "$isa"); [ -n "$flags" ] || { echo "unknown ISA $isa" >&2; exit 2; } ;;
esac
out=${DEV_OUT:-/tmp/lampe-dev}
mkdir -p "$out"
# shellcheck disable=SC2086
${CC:-cc} -std=c11 -O3 -Wall -Wextra -Wno-unused-parameter -Wno-unused-function $flags \
    "csrc/dev/$prog.c" -o "$out/${prog}_$isa" -lm
[ -n "${DEV_BUILD_ONLY:-}" ] && exit 0
exec taskset -c "${CPU:-0}" "$out/${prog}_$isa" "$@"
