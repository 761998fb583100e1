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
# compile SRC with the base flags and the ISA flags of kernel unit UNIT (default: SRC's own name)
build() {
    local src=$1 unit=${2:-$(basename "$1")} obj="$OUT/$(basename "${1%.c}").o"
    # shellcheck disable=SC2046  # the flags are meant to split into words
    $CC $CFLAGS $(flags isa "$unit") -c "$src" -o "$obj"
    echo "$obj"
}
objs=()
for src in csrc/core/*.c "${units[@]}"; do objs+=("$(build "$src")"); done
core_test=$(build tests/c/test_core.c)
$CC $SAN "${objs[@]}" "$core_test" -o "$OUT/test_core" -lm -pthread
run() { ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 "$@"; }
run "$OUT/test_core"
if [ "$(uname -m)" = x86_64 ]; then
    # the ISA tests: each test_isa_LEVEL.c gets the flags of kernels_LEVEL.c
    isa_objs=("$(build tests/c/test_isa.c)")
    for lvl in avx512 avx512bf16 amx; do isa_objs+=("$(build "tests/c/test_isa_$lvl.c" "kernels_$lvl.c")"); done
    $CC $SAN "${objs[@]}" "${isa_objs[@]}" -o "$OUT/test_isa" -lm -pthread
    run "$OUT/test_isa"
fi
