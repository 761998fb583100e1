#!/usr/bin/env bash
# Build and run the C core tests under AddressSanitizer and UBSan (no Python involved).
# -fno-wrapv: Python's default flags include -fwrapv, which would hide signed overflow from UBSan.
set -euo pipefail
cd "$(dirname "$0")/../.."
CC=${CC:-cc}
OUT=tests/c/build
mkdir -p "$OUT"
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -fno-wrapv"
CFLAGS="-std=c11 -O1 -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers -Icsrc/include $SAN"
objs=()
for src in csrc/core/*.c csrc/cpu/kernels_*.c tests/c/test_core.c; do
    extra=""
    case "$(basename "$src")" in
        kernels_avx2.c) extra="-mavx2 -mfma -mf16c" ;;
        kernels_avx512.c) extra="-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq" ;;
        kernels_avx512bf16.c) extra="-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16" ;;
    esac
    obj="$OUT/$(basename "${src%.c}").o"
    $CC $CFLAGS $extra -c "$src" -o "$obj"
    objs+=("$obj")
done
$CC $SAN "${objs[@]}" -o "$OUT/test_core" -lm -pthread
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 "$OUT/test_core"
