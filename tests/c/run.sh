#!/usr/bin/env bash
# Build and run the C core tests under AddressSanitizer and UBSan (no Python extension involved).
# Base, ISA and sanitizer flags come from lampe/_buildflags.py, the same place setup.py reads, so
# every kernel unit is tested as the package builds it. -O1 (after the base -O3) keeps the
# sanitizer build quick; -Werror makes a warning fail the run.
set -euo pipefail
cd "$(dirname "$0")/../.."
CC=${CC:-cc}
PY=${PYTHON:-python3}
OUT=tests/c/build
mkdir -p "$OUT"
flags() { "$PY" lampe/_buildflags.py "$@"; }
SAN=$(flags sanitize address,undefined)
CFLAGS="$(flags base) -O1 -Werror -Icsrc/include $SAN"
units=(csrc/cpu/kernels_scalar.c)
if [ "$(uname -m)" = x86_64 ]; then
    while read -r unit; do units+=("csrc/cpu/$unit"); done < <(flags units)
fi
objs=()
for src in csrc/core/*.c "${units[@]}" tests/c/test_core.c; do
    obj="$OUT/$(basename "${src%.c}").o"
    # shellcheck disable=SC2046  # the flags are meant to split into words
    $CC $CFLAGS $(flags isa "$(basename "$src")") -c "$src" -o "$obj"
    objs+=("$obj")
done
$CC $SAN "${objs[@]}" -o "$OUT/test_core" -lm -pthread
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 "$OUT/test_core"
