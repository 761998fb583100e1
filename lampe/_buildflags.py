"""Compiler flags of lampe's C code, in one place.

setup.py (the extension), tests/c/run.sh (the sanitized C tests) and lampe.show_config() all read
them from here, so an ISA unit cannot be built with one set of flags in the package and another in
the tests. Only the per-ISA kernel units get ``-m`` flags: anything else compiled with them could
execute an AVX-512 instruction on a CPU without it (the bitsandbytes SIGILL). No ``-march=native``
(the build machine is not the user's) and no ``-ffast-math`` (the kernels mask with IEEE -inf and
detect NaN).

This file must stay importable without the compiled extension (setup.py loads it by path before
anything is built) and without NumPy (tests/c/run.sh runs it with the bare interpreter):

    python3 lampe/_buildflags.py base            # flags of every C file
    python3 lampe/_buildflags.py units           # the ISA units, one per line
    python3 lampe/_buildflags.py isa kernels_avx512.c
    python3 lampe/_buildflags.py sanitize address,undefined
"""
from __future__ import annotations

import sys

#: Flags of every C file of the extension (the kernels add their ISA flags to these).
BASE = ["-std=c11", "-O3", "-fno-strict-aliasing", "-fvisibility=hidden", "-Wall", "-Wextra",
        "-Wno-unused-parameter", "-Wno-missing-field-initializers", "-Wno-cast-function-type"]

_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]

#: Kernel units (files of csrc/cpu, x86-64 only) and their ISA flags. kernels_scalar.c is built
#: with BASE alone on every architecture. The *_emu units are the test levels avx512bf16-emu and
#: amx-emu: the bf16 kernels with VDPBF16PS / the AMX tile unit emulated in plain AVX-512.
ISA_UNITS = {
    "kernels_avx2.c": _AVX2,
    "kernels_avx512.c": _AVX512,
    "kernels_avx512bf16.c": _AVX512 + ["-mavx512bf16"],
    "kernels_amx.c": _AVX512 + ["-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
    "kernels_avx512bf16_emu.c": _AVX512,
    "kernels_amx_emu.c": _AVX512,
}

#: A unit whose flags the compiler rejects (GCC < 10 has no -mavx512bf16, GCC < 11 no -mamx-*) is
#: left out of the build, and this macro tells csrc/core/dispatch.c that its level is missing.
UNIT_MISSING_MACRO = {
    "kernels_avx512bf16.c": "LAMPE_WITHOUT_AVX512BF16",
    "kernels_amx.c": "LAMPE_WITHOUT_AMX",
}

#: Added (with -fsanitize=KINDS) for sanitizer builds. -fno-wrapv: Python's own CFLAGS carry
#: -fwrapv, which would hide signed overflow from UBSan.
SANITIZE = ["-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-fno-wrapv"]


def isa_flags(unit: str) -> list:
    """ISA flags of kernel unit ``unit`` (a file name); [] for every other file."""
    return list(ISA_UNITS.get(unit, []))


def sanitizer_flags(kinds: str) -> list:
    """Compile flags of a sanitizer build (``kinds`` as for -fsanitize, e.g. "address,undefined")."""
    return [f"-fsanitize={kinds}"] + SANITIZE


def _main(argv) -> int:
    if argv[:1] == ["base"]:
        print(" ".join(BASE))
    elif argv[:1] == ["units"]:
        print("\n".join(ISA_UNITS))
    elif argv[:1] == ["isa"] and len(argv) == 2:
        print(" ".join(isa_flags(argv[1])))
    elif argv[:1] == ["sanitize"] and len(argv) == 2:
        print(" ".join(sanitizer_flags(argv[1])))
    else:
        print("usage: _buildflags.py base | units | isa UNIT | sanitize KINDS", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
